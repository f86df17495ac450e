/*
 * The hub (order-notifier/hub.c) with fakes for the clients, Redis and the outbox reader: what
 * reaches each client when events repeat, and when the subscribing link comes back and the
 * outbox is replayed in front of the live events.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>
#include <uv.h>

#include "hub.c"
#include "cm/json.h"

/* ---- fakes ---------------------------------------------------------------------------- */

#define MAXGOT 40000
typedef struct {
    on_hub_member_t *m;
    int started;
    int64_t got[MAXGOT];
    int ngot;
    int starts;
} fake_client_t;

typedef struct {
    char channel[64];
    cm_redis_message_fn cb;
    void *ud;
} sub_t;

static struct {
    int up;
    sub_t subs[8];
    int nsubs;
    char marker[128]; /* the last sync marker published */
    cm_redis_ping_fn ping_cb;
    void *ping_ud;
    on_outbox_query_t q;
    char users[256];
    on_outbox_row_fn row;
    on_outbox_done_fn done;
    void *read_ud;
    int reads;
} F;

static void sink_start(void *ud)
{
    fake_client_t *fc = ud;
    fc->started = 1;
    fc->starts++;
}

static void sink_deliver(void *ud, on_frame_t *f)
{
    fake_client_t *fc = ud;
    assert_true(fc->started);
    assert_true(fc->ngot < MAXGOT);
    fc->got[fc->ngot++] = f->id;
}

static void sink_close(void *ud, uint16_t code)
{
    (void)ud;
    (void)code;
}

static const on_hub_sink_t sink = {sink_start, sink_deliver, sink_close};

int cm_redis_is_up(const cm_redis_t *r)
{
    (void)r;
    return F.up;
}

int cm_redis_subscribe(cm_redis_t *r, const char *channel, cm_redis_message_fn cb, void *ud)
{
    (void)r;
    sub_t *s = &F.subs[F.nsubs++];
    snprintf(s->channel, sizeof s->channel, "%s", channel);
    s->cb = cb;
    s->ud = ud;
    return 0;
}

int cm_redis_unsubscribe(cm_redis_t *r, const char *channel)
{
    (void)r;
    for (int i = 0; i < F.nsubs; i++)
        if (strcmp(F.subs[i].channel, channel) == 0)
            F.subs[i].channel[0] = '\0';
    return 0;
}

int cm_redis_command_argv(cm_redis_t *r, cm_redis_reply_fn cb, void *ud, int argc,
                          const char **argv, const size_t *argvlen)
{
    (void)r;
    (void)cb;
    (void)ud;
    assert_int_equal(argc, 3);
    snprintf(F.marker, sizeof F.marker, "%.*s", (int)argvlen[2], argv[2]);
    return 0;
}

int cm_redis_ping(cm_redis_t *r, cm_redis_ping_fn cb, void *ud)
{
    (void)r;
    F.ping_cb = cb;
    F.ping_ud = ud;
    return 0;
}

int on_outbox_read(cm_pg_t *pg, const on_outbox_query_t *q, on_outbox_row_fn row,
                   on_outbox_done_fn done, void *ud, on_outbox_read_t **out)
{
    (void)pg;
    (void)out;
    F.q = *q;
    snprintf(F.users, sizeof F.users, "%s", q->users_json ? q->users_json : "(all)");
    F.row = row;
    F.done = done;
    F.read_ud = ud;
    F.reads++;
    return 0;
}

void on_outbox_cancel(on_outbox_read_t *r)
{
    (void)r;
}

/* ---- helpers -------------------------------------------------------------------------- */

static uv_loop_t loop;
static on_app_t app;
static on_hub_t *H;

static sub_t *sub_of(const char *channel)
{
    for (int i = 0; i < F.nsubs; i++)
        if (strcmp(F.subs[i].channel, channel) == 0)
            return &F.subs[i];
    return NULL;
}

/* The leader's message for event `id` of `user`, on one channel. */
static void publish(const char *channel, const char *user, int64_t id)
{
    sub_t *s = sub_of(channel);
    if (!s)
        return;
    char msg[256];
    int n = snprintf(msg, sizeof msg,
                     "{\"id\":%" PRId64 ",\"user_id\":\"%s\",\"event_type\":\"order.updated\","
                     "\"created_at\":\"1\",\"order\":{\"id\":1,\"user_id\":\"%s\"}}",
                     id, user, user);
    s->cb(NULL, channel, msg, (size_t)n, s->ud);
}

/* One event of `order` on the user's channel and orders:all. */
static void event_of(const char *user, int64_t id, int64_t order)
{
    char chan[64], msg[256];
    snprintf(chan, sizeof chan, "orders:user:%s", user);
    int n = snprintf(msg, sizeof msg,
                     "e1 %" PRId64 " 1.0 %" PRId64
                     "\n{\"type\":\"order_update\",\"event_id\":%" PRId64 "}",
                     id, order, id);
    sub_t *s = sub_of(chan);
    if (s)
        s->cb(NULL, chan, msg, (size_t)n, s->ud);
}

static void row_of(const char *user, int64_t id, int64_t order)
{
    char payload[96];
    snprintf(payload, sizeof payload, "{\"id\":%" PRId64 ",\"user_id\":\"%s\"}", order, user);
    on_event_t ev;
    assert_int_equal(on_event_from_row(id, user, "order.updated", payload, "1", &ev), 0);
    F.row(&ev, F.read_ud);
}

/* Both copies, as the leader publishes them. */
static void event(const char *user, int64_t id)
{
    char chan[64];
    snprintf(chan, sizeof chan, "orders:user:%s", user);
    publish(chan, user, id);
    publish("orders:all", user, id);
}

static void join(fake_client_t *fc, const char *user, int read_all)
{
    memset(fc, 0, sizeof *fc);
    assert_int_equal(on_hub_join(H, user, read_all, &sink, fc, &fc->m), 0);
    assert_false(fc->started);    /* never from inside on_hub_join */
    uv_run(&loop, UV_RUN_NOWAIT); /* an entry that is ready already starts it from the loop */
    /* Otherwise the sync marker comes back through the subscription: the client starts. */
    sub_t *s = sub_of(read_all ? "orders:all" : "");
    if (!read_all) {
        char chan[64];
        snprintf(chan, sizeof chan, "orders:user:%s", user);
        s = sub_of(chan);
    }
    assert_non_null(s);
    if (!fc->started)
        s->cb(NULL, s->channel, F.marker, strlen(F.marker), s->ud);
    assert_true(fc->started);
    assert_int_equal(fc->starts, 1);
}

static void row(const char *user, int64_t id)
{
    char order[96];
    snprintf(order, sizeof order, "{\"id\":1,\"user_id\":\"%s\"}", user);
    on_event_t ev;
    assert_int_equal(on_event_from_row(id, user, "order.updated", order, "1", &ev), 0);
    F.row(&ev, F.read_ud);
}

static int hub_done;
static void on_hub_done(void *ud)
{
    (void)ud;
    hub_done = 1;
}

static int setup(void **state)
{
    (void)state;
    memset(&F, 0, sizeof F);
    F.up = 1;
    uv_loop_init(&loop);
    memset(&app, 0, sizeof app);
    app.loop = &loop;
    app.cfg.lookback_ms = 30000;
    snprintf(app.instance, sizeof app.instance, "test");
    app.registry = cm_metrics_new();
    app.m.redis_replays = cm_metrics_counter(app.registry, "x_total", "x", NULL);
    assert_int_equal(on_hub_new(&app, &H), 0);
    on_hub_redis_state(H, 1);
    return 0;
}

static void leave(fake_client_t *fc)
{
    on_hub_leave(H, fc->m);
}

static int teardown(void **state)
{
    (void)state;
    hub_done = 0;
    on_hub_close(H, on_hub_done, NULL);
    uv_run(&loop, UV_RUN_DEFAULT);
    assert_true(hub_done);
    assert_int_equal(uv_loop_close(&loop), 0);
    cm_metrics_free(app.registry);
    assert_int_equal(cm_alloc_live(), 0);
    return 0;
}

static void assert_exactly(const fake_client_t *fc, const int64_t *want, int n)
{
    assert_int_equal(fc->ngot, n);
    for (int i = 0; i < n; i++)
        assert_int_equal(fc->got[i], want[i]);
}

/* ---- tests ---------------------------------------------------------------------------- */

/*
 * A burst of 20,000 events, then all of them again (a new leader's catch-up, or a re-send of
 * what Redis did not confirm): each client gets each event once. A fixed window of 4,096 ids
 * let thousands through the second time.
 */
static void repeats_of_a_burst_are_dropped(void **state)
{
    (void)state;
    static fake_client_t a, b, all;
    join(&a, "u1", 0);
    join(&b, "u1", 0);
    join(&all, "ops", 1);
    for (int64_t id = 1; id <= 20000; id++)
        event("u1", id);
    for (int64_t id = 1; id <= 20000; id++)
        event("u1", id);
    assert_int_equal(a.ngot, 20000);
    assert_int_equal(b.ngot, 20000);
    assert_int_equal(all.ngot, 20000);
    for (int i = 0; i < 20000; i++)
        assert_int_equal(all.got[i], i + 1);
    leave(&a);
    leave(&b);
    leave(&all);
}

/*
 * The subscribing link was down: once it is back (confirmed by a PING), the outbox is replayed
 * for this replica's users and live events wait behind it, so 12 (live) cannot overtake 11.
 */
static void replay_after_reconnect_is_merged_in_order(void **state)
{
    (void)state;
    static fake_client_t a, other;
    join(&a, "u1", 0);
    join(&other, "u2", 0);
    event("u1", 9);
    on_hub_redis_state(H, 0);
    on_hub_redis_state(H, 1);
    event("u1", 12); /* live, held: the replay is not in yet */
    const int64_t before[] = {9};
    assert_exactly(&a, before, 1);
    uv_run(&loop, UV_RUN_NOWAIT); /* the replay timer: PING on the subscribed link */
    assert_non_null(F.ping_cb);
    F.ping_cb(NULL, CM_REDIS_OK, 0.1, F.ping_ud);
    assert_int_equal(F.reads, 1);
    assert_non_null(strstr(F.users, "\"u1\""));
    assert_non_null(strstr(F.users, "\"u2\""));
    assert_true(F.q.since > 0 && F.q.limit == 0); /* back in time, no row cap */
    row("u1", 9);                                 /* had it */
    row("u1", 10);
    row("u2", 10000);
    row("u1", 11);
    event("u1", 13); /* still held */
    F.done(0, 0, F.read_ud);
    const int64_t want[] = {9, 10, 11, 12, 13};
    assert_exactly(&a, want, 5);
    const int64_t want_other[] = {10000};
    assert_exactly(&other, want_other, 1);
    event("u1", 14); /* live again */
    assert_int_equal(a.ngot, 6);
    leave(&a);
    leave(&other);
}

/*
 * An orders:read:all client makes the replay read everyone's events: more than 10,000 of
 * other users in the window do not hide the three its user missed.
 */
static void replay_has_no_row_cap(void **state)
{
    (void)state;
    static fake_client_t a, all;
    join(&a, "u1", 0);
    join(&all, "ops", 1);
    on_hub_redis_state(H, 0);
    on_hub_redis_state(H, 1);
    uv_run(&loop, UV_RUN_NOWAIT);
    F.ping_cb(NULL, CM_REDIS_OK, 0.1, F.ping_ud);
    assert_string_equal(F.users, "(all)");
    for (int64_t id = 1; id <= 12000; id++)
        row("u9", id);
    row("u1", 12001);
    row("u1", 12002);
    row("u1", 12003);
    F.done(0, 0, F.read_ud);
    const int64_t want[] = {12001, 12002, 12003};
    assert_exactly(&a, want, 3);
    assert_int_equal(all.ngot, 12003);
    leave(&a);
    leave(&all);
}

/* A failed replay keeps holding and is tried again; nothing is lost or repeated. */
static void failed_replay_is_retried(void **state)
{
    (void)state;
    static fake_client_t a;
    join(&a, "u1", 0);
    on_hub_redis_state(H, 0);
    on_hub_redis_state(H, 1);
    uv_run(&loop, UV_RUN_NOWAIT);
    F.ping_cb(NULL, CM_REDIS_OK, 0.1, F.ping_ud);
    row("u1", 1);
    event("u1", 3);
    F.done(UV_EIO, 0, F.read_ud);
    F.ping_cb = NULL;
    uv_run(&loop, UV_RUN_ONCE); /* the retry */
    assert_non_null(F.ping_cb);
    F.ping_cb(NULL, CM_REDIS_OK, 0.1, F.ping_ud);
    assert_int_equal(F.reads, 2);
    row("u1", 1);
    row("u1", 2);
    F.done(0, 0, F.read_ud);
    const int64_t want[] = {1, 2, 3};
    assert_exactly(&a, want, 3);
    leave(&a);
}

/*
 * A fresh client (no resume) and a replay that reaches back: an order's older event must not
 * come after its newer one (a client saw `filled`, then `open` again).
 */
static void replay_never_puts_an_order_back(void **state)
{
    (void)state;
    static fake_client_t a;
    join(&a, "u1", 0);
    event_of("u1", 61, 7); /* order 7's `filled`, live */
    on_hub_redis_state(H, 0);
    on_hub_redis_state(H, 1);
    uv_run(&loop, UV_RUN_NOWAIT);
    F.ping_cb(NULL, CM_REDIS_OK, 0.1, F.ping_ud);
    row_of("u1", 60, 7); /* order 7's `open`, from before the client came */
    row_of("u1", 62, 8); /* another order: owed */
    F.done(0, 0, F.read_ud);
    const int64_t want[] = {61, 62};
    assert_exactly(&a, want, 2);
    leave(&a);
}

int main(void)
{
    cm_json_init();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(repeats_of_a_burst_are_dropped, setup, teardown),
        cmocka_unit_test_setup_teardown(replay_after_reconnect_is_merged_in_order, setup, teardown),
        cmocka_unit_test_setup_teardown(replay_has_no_row_cap, setup, teardown),
        cmocka_unit_test_setup_teardown(failed_replay_is_retried, setup, teardown),
        cmocka_unit_test_setup_teardown(replay_never_puts_an_order_back, setup, teardown),
    };
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    return rc || cm_alloc_live() != 0;
}
