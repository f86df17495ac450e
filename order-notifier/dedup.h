/*
 * dedup.h: "have I already delivered event N?" for a bounded number of recent ids.
 *
 * Event ids commit out of order, and catch-up, replay after a reconnect and resume all look
 * back on purpose, so the same event can arrive twice; `id > last` would lose the late
 * committers. A set remembers the last `cap` ids it saw (FIFO eviction) with O(1) look-ups.
 * It starts small and grows to `cap`, because most users see few events.
 */
#ifndef ON_DEDUP_H
#define ON_DEDUP_H

#include <stddef.h>
#include <stdint.h>

typedef struct on_idset {
    int64_t *ring;   /* insertion order, `count` ids ending before `head` */
    size_t ring_cap; /* current ring size (grows up to cap) */
    size_t head;
    size_t count;
    size_t cap;     /* most ids remembered */
    int64_t *slots; /* open addressing, 0 = empty, -1 = deleted; size = 2 * ring_cap */
    size_t nslots;
    size_t tombs; /* deleted slots since the last rebuild */
} on_idset_t;

/* Prepares an empty set remembering up to `cap` ids (at least 8). No allocation yet. */
void on_idset_init(on_idset_t *s, size_t cap);
/* Releases the memory; the set may be initialised again. */
void on_idset_free(on_idset_t *s);
/* Non-zero when `id` (> 0) is in the set. */
int on_idset_has(const on_idset_t *s, int64_t id);
/*
 * Adds `id` (> 0), evicting the oldest when full. Returns 1 when added, 0 when it was already
 * there (a duplicate), UV_ENOMEM or UV_EINVAL.
 */
int on_idset_add(on_idset_t *s, int64_t id);
/* Number of ids remembered. */
size_t on_idset_size(const on_idset_t *s);

/* Non-zero when `id` is among the `n` ids of `ids`, sorted ascending (binary search). */
int on_idlist_has(const int64_t *ids, size_t n, int64_t id);

/*
 * Resume of one client (`last_event_id`): the missed events are read from the outbox while
 * live events keep arriving. Live events are held back until the replay has been sent, then
 * released in id order minus those the replay already delivered: no gap, no duplicate.
 */
typedef struct on_resume_item {
    int64_t id;
    void *data; /* the caller's payload, handed back by on_resume_finish */
} on_resume_item_t;

typedef struct on_resume {
    int replaying;          /* live events are held while set */
    on_idset_t sent;        /* ids sent during the replay */
    on_resume_item_t *held; /* live events held during the replay */
    size_t nheld, held_cap;
} on_resume_t;

/* Starts a resume: `replaying` on. */
void on_resume_start(on_resume_t *r);
/* A replayed event: returns 1 to send it (first time), 0 for a duplicate, or UV_ENOMEM. */
int on_resume_replayed(on_resume_t *r, int64_t id);
/*
 * A live event while replaying: held (returns 0, `data` is kept until on_resume_finish or
 * on_resume_free hands it back); when not replaying returns 1 (send it now). UV_ENOMEM on
 * failure (the caller keeps `data`).
 */
int on_resume_live(on_resume_t *r, int64_t id, void *data);
/*
 * Ends the replay: calls `emit(id, data, dup, ud)` for every held event in id order; `dup` is
 * non-zero for those already sent by the replay (or held twice). The callback owns `data`.
 */
void on_resume_finish(on_resume_t *r, void (*emit)(int64_t id, void *data, int dup, void *ud),
                      void *ud);
/* Releases the state; held payloads are handed to `drop` (may be NULL). */
void on_resume_free(on_resume_t *r, void (*drop)(void *data));

#endif
