/* The gate that merges an outbox read with the live events held meanwhile (order-notifier/gate.c).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <string.h>
#include <uv.h>

#include "cm/alloc.h"
#include "cm/json.h"
#include "gate.h"

typedef struct {
    int64_t out[64];
    int n;
    int dropped;
} sink_t;

static sink_t *cur;

static void emit(int64_t id, void *data, void *ud)
{
    sink_t *s = ud;
    assert_int_equal((intptr_t)data, id);
    s->out[s->n++] = id;
}

static void drop(void *data)
{
    (void)data;
    cur->dropped++;
}

/* What the owner does with a row the gate lets through. */
static void row(on_gate_t *g, sink_t *s, int64_t id)
{
    if (on_gate_row(g, id, emit, drop, s) == 1)
        s->out[s->n++] = id;
}

#define LIVE(g, id) on_gate_live((g), (id), (void *)(intptr_t)(id))

/*
 * A resume from last_event_id 10 (or a catch-up): the read sees 11, 12, 14, 16; live events 14
 * (in flight during the read), 13 (committed late), 15, 12 (a re-publish) and 17 arrive
 * meanwhile. The client sees one stream in id order, each id once.
 */
static void merge_in_id_order(void **state)
{
    (void)state;
    on_gate_t g;
    sink_t s = {0};
    cur = &s;
    on_gate_init(&g);
    assert_int_equal(LIVE(&g, 9), 1); /* not holding: straight through */
    on_gate_hold(&g);
    assert_true(on_gate_holding(&g));
    assert_int_equal(LIVE(&g, 14), 0);
    row(&g, &s, 11);
    assert_int_equal(LIVE(&g, 13), 0);
    row(&g, &s, 12);
    row(&g, &s, 14); /* releases 13, drops the held copy of 14 */
    assert_int_equal(LIVE(&g, 15), 0);
    assert_int_equal(LIVE(&g, 12), ON_GATE_DUP); /* merged already: the caller drops it */
    assert_int_equal(LIVE(&g, 17), 0);
    row(&g, &s, 16); /* releases 15 */
    row(&g, &s, 16); /* a repeated row is not sent twice */
    on_gate_release(&g, emit, drop, &s);
    const int64_t want[] = {11, 12, 13, 14, 15, 16, 17};
    assert_int_equal(s.n, 7);
    assert_memory_equal(s.out, want, sizeof want);
    assert_int_equal(s.dropped, 1);
    assert_false(on_gate_holding(&g));
    assert_int_equal(LIVE(&g, 18), 1);
    on_gate_free(&g, drop);
    assert_int_equal(cm_alloc_live(), 0);
}

/*
 * The big-event case: an order's updates are 20 (partially_filled), 21 (big: read from the
 * outbox), 22 (filled). Whatever order the live copies come in, 20 < 21 < 22 goes out.
 */
static void held_items_come_out_sorted(void **state)
{
    (void)state;
    on_gate_t g;
    sink_t s = {0};
    cur = &s;
    on_gate_init(&g);
    on_gate_hold(&g);
    for (int64_t id = 100; id > 0; id -= 3)
        assert_int_equal(LIVE(&g, id), 0);
    assert_int_equal(LIVE(&g, 100), 0); /* held twice: sent once */
    row(&g, &s, 50);
    on_gate_release(&g, emit, drop, &s);
    for (int i = 1; i < s.n; i++)
        assert_true(s.out[i - 1] < s.out[i]);
    assert_int_equal(s.dropped, 1);
    on_gate_free(&g, drop);
    assert_int_equal(cm_alloc_live(), 0);
}

/* Abandoned (the client left, leadership lost): what is held is dropped, nothing leaks. */
static void abandoned(void **state)
{
    (void)state;
    on_gate_t g;
    sink_t s = {0};
    cur = &s;
    on_gate_init(&g);
    on_gate_hold(&g);
    for (int64_t id = 1; id <= 40; id++)
        assert_int_equal(LIVE(&g, id * 2), 0);
    row(&g, &s, 3); /* releases 2 */
    on_gate_free(&g, drop);
    assert_int_equal(s.n, 2);
    assert_int_equal(s.dropped, 39);
    assert_false(on_gate_holding(&g));
    assert_int_equal(cm_alloc_live(), 0);
}

static void nomem_while_holding(void **state)
{
    (void)state;
    on_gate_t g;
    sink_t s = {0};
    cur = &s;
    on_gate_init(&g);
    on_gate_hold(&g);
    cm_alloc_fail_after(1);
    assert_int_equal(LIVE(&g, 5), UV_ENOMEM); /* the caller keeps it (and sends it) */
    cm_alloc_fail_after(0);
    assert_int_equal(LIVE(&g, 6), 0);
    on_gate_free(&g, drop);
    assert_int_equal(s.dropped, 1);
    assert_int_equal(cm_alloc_live(), 0);
}

int main(void)
{
    cm_json_init();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(merge_in_id_order),
        cmocka_unit_test(held_items_come_out_sorted),
        cmocka_unit_test(abandoned),
        cmocka_unit_test(nomem_while_holding),
    };
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    return rc || cm_alloc_live() != 0;
}
