#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <string.h>
#include <uv.h>

#include "cm/alloc.h"
#include "cm/json.h"
#include "dedup.h"

static void idset_basic(void **state)
{
    (void)state;
    on_idset_t s;
    on_idset_init(&s, 100, 0);
    assert_false(on_idset_has(&s, 5));
    assert_int_equal(on_idset_add(&s, 5, 0), 1);
    assert_int_equal(on_idset_add(&s, 5, 0), 0);
    assert_true(on_idset_has(&s, 5));
    assert_int_equal(on_idset_add(&s, 0, 0), UV_EINVAL);
    /* Out of order ids are all remembered, unlike a high-water mark. */
    assert_int_equal(on_idset_add(&s, 9, 0), 1);
    assert_int_equal(on_idset_add(&s, 7, 0), 1);
    assert_int_equal(on_idset_add(&s, 7, 0), 0);
    assert_int_equal(on_idset_size(&s), 3);
    on_idset_free(&s);
}

/* Without a window the set is a FIFO of `cap` ids. */
static void idset_fifo(void **state)
{
    (void)state;
    on_idset_t s;
    on_idset_init(&s, 1000, 0);
    for (int64_t id = 1; id <= 5000; id++)
        assert_int_equal(on_idset_add(&s, id, 0), 1);
    assert_int_equal(on_idset_size(&s), 1000);
    for (int64_t id = 4001; id <= 5000; id++)
        assert_true(on_idset_has(&s, id));
    assert_false(on_idset_has(&s, 4000));
    assert_false(on_idset_has(&s, 1));
    /* Churn many times over the table: tombstones must not break look-ups. */
    for (int64_t id = 100000; id < 200000; id += 7)
        assert_int_equal(on_idset_add(&s, id, 0), 1);
    assert_true(on_idset_has(&s, 199995 - 7 * 3));
    assert_int_equal(on_idset_add(&s, 199995 - 7 * 3, 0), 0);
    on_idset_free(&s);
    assert_int_equal(cm_alloc_live(), 0);
}

/*
 * The receivers' case: a burst of 50,000 ids within the window is remembered whole (a fixed
 * count of 4,096 let a catch-up repeat thousands), and ids older than the window go.
 */
static void idset_time_window(void **state)
{
    (void)state;
    on_idset_t s;
    on_idset_init(&s, 0, 45000);
    for (int64_t id = 1; id <= 50000; id++)
        assert_int_equal(on_idset_add(&s, id, 1000 + (uint64_t)id / 100), 1);
    assert_int_equal(on_idset_size(&s), 50000);
    for (int64_t id = 1; id <= 50000; id++)
        assert_int_equal(on_idset_add(&s, id, 2000), 0);
    /* 45.25 s after the first ones: only those added in the last 45 s stay. */
    assert_int_equal(on_idset_add(&s, 60000, 1000 + 45250), 1);
    assert_false(on_idset_has(&s, 1));
    assert_false(on_idset_has(&s, 24999));
    assert_true(on_idset_has(&s, 25100));
    assert_true(on_idset_has(&s, 50000));
    /* A minute later everything old is gone and the memory shrinks back. */
    for (int64_t id = 70000; id < 70100; id++)
        assert_int_equal(on_idset_add(&s, id, 200000), 1);
    assert_int_equal(on_idset_size(&s), 100);
    assert_true(s.ring_cap <= 1024);
    assert_int_equal(s.forced, 0);
    on_idset_free(&s);
    assert_int_equal(cm_alloc_live(), 0);
}

/* The hard cap still bounds memory inside the window, and says so. */
static void idset_cap_inside_window(void **state)
{
    (void)state;
    on_idset_t s;
    on_idset_init(&s, 64, 60000);
    for (int64_t id = 1; id <= 100; id++)
        assert_int_equal(on_idset_add(&s, id, 5), 1);
    assert_int_equal(on_idset_size(&s), 64);
    assert_int_equal(s.forced, 36);
    assert_false(on_idset_has(&s, 36));
    assert_true(on_idset_has(&s, 37));
    on_idset_free(&s);
}

static void idset_nomem(void **state)
{
    (void)state;
    on_idset_t s;
    on_idset_init(&s, 100, 0);
    cm_alloc_fail_after(1);
    assert_int_equal(on_idset_add(&s, 1, 0), UV_ENOMEM);
    cm_alloc_fail_after(0);
    assert_int_equal(on_idset_add(&s, 1, 0), 1);
    on_idset_free(&s);
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
    cm_json_init();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(idset_basic),       cmocka_unit_test(idset_fifo),
        cmocka_unit_test(idset_time_window), cmocka_unit_test(idset_cap_inside_window),
        cmocka_unit_test(idset_nomem),       cmocka_unit_test(idlist_lookup),
    };
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    return rc || cm_alloc_live() != 0;
}
