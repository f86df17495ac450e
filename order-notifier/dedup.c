#include "dedup.h"

#include "cm/alloc.h"

#include <stdlib.h>
#include <string.h>
#include <uv.h>

#define EMPTY 0
#define TOMB (-1)
#define MIN_RING 8

void on_idset_init(on_idset_t *s, size_t cap, uint64_t window_ms)
{
    memset(s, 0, sizeof *s);
    s->cap = cap;
    s->window_ms = window_ms;
    if (window_ms == 0 && s->cap < MIN_RING)
        s->cap = MIN_RING;
}

void on_idset_free(on_idset_t *s)
{
    cm_free(s->ring);
    cm_free(s->times);
    cm_free(s->slots);
    on_idset_init(s, s->cap, s->window_ms);
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

/* Rebuilds ring and table at `ring_cap` (a power of two >= count), dropping tombstones. */
static int rebuild(on_idset_t *s, size_t ring_cap)
{
    size_t nslots = ring_cap * 2;
    int64_t *ring = cm_malloc(ring_cap * sizeof *ring);
    uint64_t *times = cm_malloc(ring_cap * sizeof *times);
    int64_t *slots = cm_calloc(nslots, sizeof *slots);
    if (!ring || !times || !slots) {
        cm_free(ring);
        cm_free(times);
        cm_free(slots);
        return UV_ENOMEM;
    }
    for (size_t k = 0; k < s->count; k++) {
        size_t from = (s->head + s->ring_cap - s->count + k) & (s->ring_cap - 1);
        ring[k] = s->ring[from];
        times[k] = s->times[from];
        slot_put(slots, nslots, ring[k]);
    }
    cm_free(s->ring);
    cm_free(s->times);
    cm_free(s->slots);
    s->ring = ring;
    s->times = times;
    s->slots = slots;
    s->ring_cap = ring_cap;
    s->nslots = nslots;
    s->tombs = 0;
    s->head = s->count & (ring_cap - 1);
    return 0;
}

static void evict_oldest(on_idset_t *s)
{
    size_t oldest = (s->head + s->ring_cap - s->count) & (s->ring_cap - 1);
    slot_del(s, s->ring[oldest]);
    s->count--;
    s->tombs++;
}

int on_idset_add(on_idset_t *s, int64_t id, uint64_t now_ms)
{
    if (id <= 0)
        return UV_EINVAL;
    if (on_idset_has(s, id))
        return 0;
    /* Forget what the window no longer covers. */
    if (s->window_ms > 0) {
        while (s->count > 0) {
            size_t oldest = (s->head + s->ring_cap - s->count) & (s->ring_cap - 1);
            if (now_ms - s->times[oldest] < s->window_ms || now_ms < s->times[oldest])
                break;
            evict_oldest(s);
        }
    }
    if (s->cap > 0 && s->count >= s->cap) {
        if (s->window_ms > 0)
            s->forced++;
        evict_oldest(s);
    }
    if (s->count == s->ring_cap) {
        if (rebuild(s, s->ring_cap ? s->ring_cap * 2 : MIN_RING) != 0)
            return UV_ENOMEM;
    } else if (s->tombs > s->ring_cap / 2) {
        /* Tombstones slow look-ups down; shrink to fit once the window has moved on. */
        size_t want = s->ring_cap;
        while (want > MIN_RING && s->count * 4 < want)
            want /= 2;
        if (rebuild(s, want) != 0)
            return UV_ENOMEM;
    }
    s->ring[s->head] = id;
    s->times[s->head] = now_ms;
    s->head = (s->head + 1) & (s->ring_cap - 1);
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

/* ---- last event per order ---------------------------------------------------------------- */

void on_ordermap_init(on_ordermap_t *m, uint64_t window_ms)
{
    memset(m, 0, sizeof *m);
    m->window_ms = window_ms;
}

void on_ordermap_free(on_ordermap_t *m)
{
    cm_free(m->slots);
    on_ordermap_init(m, m->window_ms);
}

static on_ordermap_slot_t *ordermap_find(on_ordermap_slot_t *slots, size_t n, int64_t order_id)
{
    size_t mask = n - 1;
    size_t i = hash_id(order_id, n);
    while (slots[i].order_id != 0 && slots[i].order_id != order_id)
        i = (i + 1) & mask;
    return &slots[i];
}

/* Rebuilds at `n` slots, keeping the orders seen within the window. */
static int ordermap_rebuild(on_ordermap_t *m, size_t n, uint64_t now_ms)
{
    on_ordermap_slot_t *slots = cm_calloc(n, sizeof *slots);
    if (!slots)
        return UV_ENOMEM;
    size_t count = 0;
    for (size_t i = 0; i < m->nslots; i++) {
        on_ordermap_slot_t *o = &m->slots[i];
        if (o->order_id == 0 || (now_ms >= o->at_ms && now_ms - o->at_ms >= m->window_ms))
            continue;
        *ordermap_find(slots, n, o->order_id) = *o;
        count++;
    }
    cm_free(m->slots);
    m->slots = slots;
    m->nslots = n;
    m->count = count;
    return 0;
}

int on_ordermap_check(on_ordermap_t *m, int64_t order_id, int64_t event_id, uint64_t now_ms)
{
    if (order_id <= 0)
        return 1;
    if (m->nslots && m->count * 2 >= m->nslots) {
        /* Full enough: forget what the window no longer covers, grow if that is not enough. */
        if (ordermap_rebuild(m, m->nslots, now_ms) != 0)
            return UV_ENOMEM;
        if (m->count * 4 >= m->nslots && ordermap_rebuild(m, m->nslots * 2, now_ms) != 0)
            return UV_ENOMEM;
    }
    if (!m->nslots && ordermap_rebuild(m, 64, now_ms) != 0)
        return UV_ENOMEM;
    on_ordermap_slot_t *s = ordermap_find(m->slots, m->nslots, order_id);
    if (s->order_id == order_id) {
        int fresh = now_ms < s->at_ms || now_ms - s->at_ms < m->window_ms;
        if (fresh && s->event_id > event_id)
            return 0;
        if (event_id > s->event_id || !fresh)
            s->event_id = event_id;
        s->at_ms = now_ms;
        return 1;
    }
    s->order_id = order_id;
    s->event_id = event_id;
    s->at_ms = now_ms;
    m->count++;
    return 1;
}
