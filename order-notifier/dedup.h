/*
 * dedup.h: "have I already delivered event N?" for every id seen within a time window.
 *
 * Event ids commit out of order, and a new leader's catch-up, the replay after a Redis
 * reconnect and the publisher's re-send of what Redis did not confirm all look back on purpose,
 * so the same event can arrive twice; `id > last` would lose the late committers. How far back
 * they look is a time (NOTIFIER_CATCHUP_LOOKBACK_MS), not a number of events, so the set keeps
 * every id for at least `window_ms` after it was added, however many there are; a burst of
 * 20,000 events for one user is remembered whole. `cap` only bounds memory against a runaway
 * (0: no bound); ids evicted by it early are counted in `forced`.
 */
#ifndef ON_DEDUP_H
#define ON_DEDUP_H

#include <stddef.h>
#include <stdint.h>

typedef struct on_idset {
    int64_t *ring;   /* insertion order, `count` ids ending before `head` */
    uint64_t *times; /* when each ring entry was added (caller's ms clock) */
    size_t ring_cap; /* current ring size (a power of two, grows as needed) */
    size_t head;
    size_t count;
    size_t cap;         /* most ids remembered, 0: no bound */
    uint64_t window_ms; /* keep ids at least this long; 0: keep until `cap` pushes them out */
    int64_t *slots;     /* open addressing, 0 = empty, -1 = deleted; size = 2 * ring_cap */
    size_t nslots;
    size_t tombs;    /* deleted slots since the last rebuild */
    uint64_t forced; /* ids evicted by `cap` while still inside the window */
} on_idset_t;

/* Prepares an empty set (no allocation yet). With window_ms 0 it is a FIFO of `cap` ids (cap
 * must then be > 0). */
void on_idset_init(on_idset_t *s, size_t cap, uint64_t window_ms);
/* Releases the memory; the set may be used again (same cap and window). */
void on_idset_free(on_idset_t *s);
/* Non-zero when `id` (> 0) is in the set. */
int on_idset_has(const on_idset_t *s, int64_t id);
/*
 * Adds `id` (> 0) at time `now_ms`, first forgetting ids older than the window. Returns 1 when
 * added, 0 when it was already there (a duplicate), UV_ENOMEM or UV_EINVAL.
 */
int on_idset_add(on_idset_t *s, int64_t id, uint64_t now_ms);
/* Number of ids remembered. */
size_t on_idset_size(const on_idset_t *s);

/*
 * The last event id delivered per order, for a time window: an order's events go out in id
 * order (each update of an order takes its id after the previous one committed), so an event
 * below the last one delivered for its order is either a repeat or older than anything its
 * receivers are owed, and must not go out after the newer one.
 */
typedef struct on_ordermap_slot {
    int64_t order_id; /* 0: empty */
    int64_t event_id;
    uint64_t at_ms;
} on_ordermap_slot_t;

typedef struct on_ordermap {
    on_ordermap_slot_t *slots;
    size_t nslots; /* a power of two, or 0 */
    size_t count;
    uint64_t window_ms;
} on_ordermap_t;

void on_ordermap_init(on_ordermap_t *m, uint64_t window_ms);
void on_ordermap_free(on_ordermap_t *m);
/*
 * Event `event_id` of order `order_id` (> 0) is about to go out at `now_ms`. Returns 1 when it
 * may (it is now the order's last), 0 when a higher id of the same order went out already
 * within the window, or UV_ENOMEM (the caller lets it go out).
 */
int on_ordermap_check(on_ordermap_t *m, int64_t order_id, int64_t event_id, uint64_t now_ms);

/* Non-zero when `id` is among the `n` ids of `ids`, sorted ascending (binary search). */
int on_idlist_has(const int64_t *ids, size_t n, int64_t id);

#endif
