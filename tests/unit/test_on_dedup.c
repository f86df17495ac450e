#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <string.h>
#include <uv.h>

#include "cm/alloc.h"
#include "dedup.h"

static void idset_basic(void **state)
{
    (void)state;
    on_idset_t s;
    on_idset_init(&s, 100);
    assert_false(on_idset_has(&s, 5));
    assert_int_equal(on_idset_add(&s, 5), 1);
    assert_int_equal(on_idset_add(&s, 5), 0);
    assert_true(on_idset_has(&s, 5));
    assert_int_equal(on_idset_add(&s, 0), UV_EINVAL);
    /* Out of order ids are all remembered, unlike a high-water mark. */
    assert_int_equal(on_idset_add(&s, 9), 1);
    assert_int_equal(on_idset_add(&s, 7), 1);
    assert_int_equal(on_idset_add(&s, 7), 0);
    assert_int_equal(on_idset_size(&s), 3);
    on_idset_free(&s);
}

static void idset_window(void **state)
{
    (void)state;
    on_idset_t s;
    on_idset_init(&s, 1000);
    for (int64_t id = 1; id <= 5000; id++)
        assert_int_equal(on_idset_add(&s, id), 1);
    assert_int_equal(on_idset_size(&s), 1000);
    /* The most recent 1000 are remembered, older ones forgotten. */
    for (int64_t id = 4001; id <= 5000; id++)
        assert_true(on_idset_has(&s, id));
    assert_false(on_idset_has(&s, 4000));
    assert_false(on_idset_has(&s, 1));
    /* Churn many times over the table: tombstones must not break look-ups. */
    for (int64_t id = 100000; id < 200000; id += 7)
        assert_int_equal(on_idset_add(&s, id), 1);
    assert_true(on_idset_has(&s, 199995 - 7 * 3));
    assert_int_equal(on_idset_add(&s, 199995 - 7 * 3), 0);
    on_idset_free(&s);
    assert_int_equal(cm_alloc_live(), 0);
}

static void idset_nomem(void **state)
{
    (void)state;
    on_idset_t s;
    on_idset_init(&s, 100);
    cm_alloc_fail_after(1);
    assert_int_equal(on_idset_add(&s, 1), UV_ENOMEM);
    cm_alloc_fail_after(0);
    assert_int_equal(on_idset_add(&s, 1), 1);
    on_idset_free(&s);
}

typedef struct {
    int64_t out[64];
    int n;
    int dups;
} sink_t;

static void emit(int64_t id, void *data, int dup, void *ud)
{
    sink_t *s = ud;
    assert_int_equal((intptr_t)data, id);
    if (dup)
        s->dups++;
    else
        s->out[s->n++] = id;
}

/*
 * last_event_id = 10. The replay query sees 11, 12, 14 (13 commits later, out of order);
 * live events 14 (in flight during the query), 13, 15, 12 (a re-publish) arrive meanwhile.
 */
static void resume_merge(void **state)
{
    (void)state;
    on_resume_t r;
    on_resume_start(&r);
    sink_t s = {0};
    assert_int_equal(on_resume_live(&r, 14, (void *)(intptr_t)14), 0);
    assert_int_equal(on_resume_replayed(&r, 11), 1);
    assert_int_equal(on_resume_live(&r, 13, (void *)(intptr_t)13), 0);
    assert_int_equal(on_resume_replayed(&r, 12), 1);
    assert_int_equal(on_resume_replayed(&r, 14), 1);
    assert_int_equal(on_resume_replayed(&r, 14), 0);
    assert_int_equal(on_resume_live(&r, 15, (void *)(intptr_t)15), 0);
    assert_int_equal(on_resume_live(&r, 12, (void *)(intptr_t)12), 0);
    assert_int_equal(on_resume_live(&r, 15, (void *)(intptr_t)15), 0);
    on_resume_finish(&r, emit, &s);
    /* 11, 12, 14 went out during the replay; then 13 and 15 once each. */
    assert_int_equal(s.n, 2);
    assert_int_equal(s.out[0], 13);
    assert_int_equal(s.out[1], 15);
    assert_int_equal(s.dups, 3);
    /* After the replay, live events pass straight through. */
    assert_int_equal(on_resume_live(&r, 16, NULL), 1);
    on_resume_free(&r, NULL);
    assert_int_equal(cm_alloc_live(), 0);
}

static int dropped;
static void drop(void *data)
{
    (void)data;
    dropped++;
}

static void resume_abandoned(void **state)
{
    (void)state;
    on_resume_t r;
    on_resume_start(&r);
    on_resume_replayed(&r, 3);
    on_resume_live(&r, 4, NULL);
    on_resume_live(&r, 5, NULL);
    on_resume_free(&r, drop);
    assert_int_equal(dropped, 2);
    assert_int_equal(cm_alloc_live(), 0);
}

/* A resumed client's replayed ids: exact look-ups, nothing found between or outside them. */
static void idlist_lookup(void **state)
{
    (void)state;
    assert_false(on_idlist_has(NULL, 0, 5));
    const int64_t one[] = {7};
    assert_true(on_idlist_has(one, 1, 7));
    assert_false(on_idlist_has(one, 1, 6));
    assert_false(on_idlist_has(one, 1, 8));
    int64_t ids[1000];
    for (int i = 0; i < 1000; i++)
        ids[i] = 9 + 3 * (int64_t)i; /* crosses 99 -> 102 and 999 -> 1002 */
    for (int i = 0; i < 1000; i++) {
        assert_true(on_idlist_has(ids, 1000, ids[i]));
        assert_false(on_idlist_has(ids, 1000, ids[i] + 1));
    }
    assert_false(on_idlist_has(ids, 1000, 8));
    assert_false(on_idlist_has(ids, 1000, ids[999] + 3));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(idset_basic),      cmocka_unit_test(idset_window),
        cmocka_unit_test(idset_nomem),      cmocka_unit_test(resume_merge),
        cmocka_unit_test(resume_abandoned), cmocka_unit_test(idlist_lookup),
    };
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    return rc || cm_alloc_live() != 0;
}
