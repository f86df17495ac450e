#include "dedup.h"

#include "cm/alloc.h"

#include <stdlib.h>
#include <string.h>
#include <uv.h>

#define EMPTY 0
#define TOMB (-1)

void on_idset_init(on_idset_t *s, size_t cap)
{
    memset(s, 0, sizeof *s);
    s->cap = cap < 8 ? 8 : cap;
}

void on_idset_free(on_idset_t *s)
{
    size_t cap = s->cap;
    cm_free(s->ring);
    cm_free(s->slots);
    on_idset_init(s, cap);
}

static size_t hash_id(int64_t id, size_t n)
{
    uint64_t x = (uint64_t)id * 0x9E3779B97F4A7C15ull;
    return (size_t)(x >> 17) & (n - 1);
}

int on_idset_has(const on_idset_t *s, int64_t id)
{
    if (!s->nslots || id <= 0)
        return 0;
    size_t mask = s->nslots - 1;
    for (size_t i = hash_id(id, s->nslots), n = 0; n < s->nslots; i = (i + 1) & mask, n++) {
        if (s->slots[i] == id)
            return 1;
        if (s->slots[i] == EMPTY)
            return 0;
    }
    return 0;
}

static void slot_put(int64_t *slots, size_t nslots, int64_t id)
{
    size_t mask = nslots - 1;
    size_t i = hash_id(id, nslots);
    while (slots[i] != EMPTY && slots[i] != TOMB)
        i = (i + 1) & mask;
    slots[i] = id;
}

static void slot_del(on_idset_t *s, int64_t id)
{
    size_t mask = s->nslots - 1;
    for (size_t i = hash_id(id, s->nslots), n = 0; n < s->nslots; i = (i + 1) & mask, n++) {
        if (s->slots[i] == id) {
            s->slots[i] = TOMB;
            return;
        }
        if (s->slots[i] == EMPTY)
            return;
    }
}

/* Rebuilds ring and table at `ring_cap` (a power of two), dropping tombstones. */
static int rebuild(on_idset_t *s, size_t ring_cap)
{
    size_t nslots = ring_cap * 2;
    int64_t *ring = cm_malloc(ring_cap * sizeof *ring);
    int64_t *slots = cm_calloc(nslots, sizeof *slots);
    if (!ring || !slots) {
        cm_free(ring);
        cm_free(slots);
        return UV_ENOMEM;
    }
    size_t keep = s->count < ring_cap ? s->count : ring_cap;
    for (size_t k = 0; k < keep; k++) {
        /* oldest first, so the newest `keep` survive */
        size_t from = (s->head + s->ring_cap - keep + k) % (s->ring_cap ? s->ring_cap : 1);
        ring[k] = s->ring[from];
        slot_put(slots, nslots, ring[k]);
    }
    cm_free(s->ring);
    cm_free(s->slots);
    s->ring = ring;
    s->slots = slots;
    s->ring_cap = ring_cap;
    s->nslots = nslots;
    s->tombs = 0;
    s->count = keep;
    s->head = keep % ring_cap;
    return 0;
}

int on_idset_add(on_idset_t *s, int64_t id)
{
    if (id <= 0)
        return UV_EINVAL;
    if (on_idset_has(s, id))
        return 0;
    if (s->count == s->ring_cap) {
        size_t limit = 8;
        while (limit < s->cap)
            limit *= 2;
        if (s->ring_cap < limit) {
            if (rebuild(s, s->ring_cap ? s->ring_cap * 2 : 8) != 0)
                return UV_ENOMEM;
        }
    }
    if (s->count == s->ring_cap || s->count >= s->cap) {
        /* Full: forget the oldest. */
        size_t oldest = (s->head + s->ring_cap - s->count) % s->ring_cap;
        slot_del(s, s->ring[oldest]);
        s->count--;
        s->tombs++;
        /* Tombstones slow look-ups down; rebuild once they pile up. */
        if (s->tombs > s->ring_cap) {
            if (rebuild(s, s->ring_cap) != 0)
                return UV_ENOMEM;
        }
    }
    s->ring[s->head] = id;
    s->head = (s->head + 1) % s->ring_cap;
    s->count++;
    slot_put(s->slots, s->nslots, id);
    return 1;
}

size_t on_idset_size(const on_idset_t *s)
{
    return s->count;
}

int on_idlist_has(const int64_t *ids, size_t n, int64_t id)
{
    size_t lo = 0, hi = n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (ids[mid] == id)
            return 1;
        if (ids[mid] < id)
            lo = mid + 1;
        else
            hi = mid;
    }
    return 0;
}

/* ---- resume ----------------------------------------------------------------------------- */

void on_resume_start(on_resume_t *r)
{
    memset(r, 0, sizeof *r);
    r->replaying = 1;
    on_idset_init(&r->sent, 2048);
}

int on_resume_replayed(on_resume_t *r, int64_t id)
{
    int rc = on_idset_add(&r->sent, id);
    return rc;
}

int on_resume_live(on_resume_t *r, int64_t id, void *data)
{
    if (!r->replaying)
        return 1;
    if (r->nheld == r->held_cap) {
        size_t cap = r->held_cap ? r->held_cap * 2 : 16;
        on_resume_item_t *p = cm_realloc(r->held, cap * sizeof *p);
        if (!p)
            return UV_ENOMEM;
        r->held = p;
        r->held_cap = cap;
    }
    r->held[r->nheld++] = (on_resume_item_t){id, data};
    return 0;
}

static int cmp_item(const void *a, const void *b)
{
    int64_t x = ((const on_resume_item_t *)a)->id, y = ((const on_resume_item_t *)b)->id;
    return (x > y) - (x < y);
}

void on_resume_finish(on_resume_t *r, void (*emit)(int64_t id, void *data, int dup, void *ud),
                      void *ud)
{
    r->replaying = 0;
    if (r->nheld > 1)
        qsort(r->held, r->nheld, sizeof *r->held, cmp_item);
    for (size_t i = 0; i < r->nheld; i++) {
        int dup =
            on_idset_has(&r->sent, r->held[i].id) || (i > 0 && r->held[i - 1].id == r->held[i].id);
        emit(r->held[i].id, r->held[i].data, dup, ud);
    }
    cm_free(r->held);
    r->held = NULL;
    r->nheld = r->held_cap = 0;
    on_idset_free(&r->sent);
}

void on_resume_free(on_resume_t *r, void (*drop)(void *data))
{
    for (size_t i = 0; i < r->nheld; i++)
        if (drop)
            drop(r->held[i].data);
    cm_free(r->held);
    r->held = NULL;
    r->nheld = r->held_cap = 0;
    on_idset_free(&r->sent);
}
