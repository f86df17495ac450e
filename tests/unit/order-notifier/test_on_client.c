/*
 * The client's state machine (order-notifier/client.c) with fakes for the WebSocket session,
 * the hub and the outbox reader: welcome first, a resume merged in id order with the live
 * events held meanwhile, no event twice, the truncation told, a slow consumer closed.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <cjson/cJSON.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>
#include <uv.h>

#include "client.c"

/* ---- fakes ---------------------------------------------------------------------------- */

#define MAXSENT 2048
static struct {
    int64_t sent[MAXSENT]; /* event ids sent, or -1 welcome, -2 pong, -3 resume_truncated */
    int nsent;
    int send_rc; /* what the next sends return */
    int closed_with;
    int started_ws;
    on_hub_sink_t sink;
    void *sink_ud;
    int joined, left;
    on_outbox_query_t q;
    int64_t skip[300];
    on_outbox_row_fn row;
    on_outbox_done_fn done;
    void *read_ud;
    int reads;
} F;

static int64_t kind_of(const char *data, size_t len)
{
    cJSON *j = cJSON_ParseWithLength(data, len);
    assert_non_null(j);
    const char *type = cJSON_GetObjectItemCaseSensitive(j, "type")->valuestring;
    int64_t k = strcmp(type, "welcome") == 0 ? -1 : strcmp(type, "pong") == 0 ? -2 : -3;
    if (strcmp(type, "order_update") == 0)
        k = (int64_t)cJSON_GetObjectItemCaseSensitive(j, "event_id")->valuedouble;
    cJSON_Delete(j);
    return k;
}

static void record(const char *data, size_t len)
{
    assert_true(F.nsent < MAXSENT);
    F.sent[F.nsent++] = kind_of(data, len);
}

int cm_ws_send_text(cm_ws_t *ws, const char *data, size_t len)
{
    (void)ws;
    record(data, len);
    return F.send_rc;
}

int cm_ws_send_frame(cm_ws_t *ws, cm_ws_frame_t *f)
{
    (void)ws;
    size_t len = 0;
    const char *p = cm_ws_frame_payload(f, &len);
    record(p, len);
    return F.send_rc;
}

int cm_ws_send(cm_ws_t *ws, int opcode, const void *data, size_t len)
{
    (void)ws;
    (void)opcode;
    (void)data;
    (void)len;
    return 0;
}

int cm_ws_close(cm_ws_t *ws, uint16_t code, const char *reason)
{
    (void)ws;
    (void)reason;
    F.closed_with = code;
    return 0;
}

void cm_ws_abort(cm_ws_t *ws)
{
    (void)ws;
}

void cm_ws_start(cm_ws_t *ws)
{
    (void)ws;
    F.started_ws = 1;
}

size_t cm_ws_queued_bytes(const cm_ws_t *ws)
{
    (void)ws;
    return 0;
}

void cm_ws_config_defaults(cm_ws_config_t *cfg)
{
    memset(cfg, 0, sizeof *cfg);
}

int cm_ws_accept(cm_http_request_t *req, const cm_ws_config_t *cfg, const cm_ws_callbacks_t *cbs,
                 void *ud, cm_ws_t **out)
{
    (void)req;
    (void)cfg;
    (void)cbs;
    (void)ud;
    (void)out;
    return UV_ENOTSUP;
}

cm_http_conn_t *cm_ws_conn(const cm_ws_t *ws)
{
    (void)ws;
    return NULL;
}

int on_hub_join(on_hub_t *h, const char *user_id, int read_all, const on_hub_sink_t *sink, void *ud,
                on_hub_member_t **out)
{
    (void)h;
    (void)user_id;
    (void)read_all;
    F.sink = *sink;
    F.sink_ud = ud;
    F.joined++;
    *out = (on_hub_member_t *)&F;
    return 0;
}

void on_hub_leave(on_hub_t *h, on_hub_member_t *m)
{
    (void)h;
    if (m)
        F.left++;
}

int on_outbox_read(cm_pg_t *pg, const on_outbox_query_t *q, on_outbox_row_fn row,
                   on_outbox_done_fn done, void *ud, on_outbox_read_t **out)
{
    (void)pg;
    (void)out;
    F.q = *q;
    if (q->nskip)
        memcpy(F.skip, q->skip, q->nskip * sizeof *q->skip);
    F.row = row;
    F.done = done;
    F.read_ud = ud;
    F.reads++;
    return 0;
}

int on_stream_request_parse(cm_http_request_t *req, on_app_t *app, const char *last_id,
                            on_stream_request_t *out)
{
    (void)req;
    (void)app;
    (void)last_id;
    (void)out;
    return UV_ENOTSUP;
}

void on_stream_reject(cm_http_request_t *req, on_app_t *app, int status, const char *code,
                      const char *message, const char *headers)
{
    (void)req;
    (void)app;
    (void)status;
    (void)code;
    (void)message;
    (void)headers;
}

/* ---- helpers -------------------------------------------------------------------------- */

static uv_loop_t loop;
static on_app_t app;

static on_client_t *client(int64_t resume_from, const int64_t *recent, size_t nrecent)
{
    on_client_t *c = cm_calloc(1, sizeof *c);
    c->app = &app;
    on_gate_init(&c->gate);
    snprintf(c->claims.sub, sizeof c->claims.sub, "u1");
    c->claims.exp = (int64_t)time(NULL) + 3600;
    c->resume_from = resume_from;
    if (nrecent) {
        c->recent = cm_malloc(nrecent * sizeof *recent);
        memcpy(c->recent, recent, nrecent * sizeof *recent);
        c->nrecent = nrecent;
    }
    c->ws = (cm_ws_t *)&F; /* never dereferenced by the fakes */
    client_join(c);
    assert_int_equal(F.joined, 1);
    return c;
}

static void live(on_client_t *c, int64_t id)
{
    char json[160];
    int n = snprintf(json, sizeof json,
                     "{\"type\":\"order_update\",\"event_id\":%" PRId64 ",\"order\":{}}", id);
    on_frame_t *f = on_frame_new(id, 0, json, (size_t)n);
    F.sink.deliver(F.sink_ud, f);
    (void)c;
    on_frame_unref(f);
}

static void row(int64_t id)
{
    on_event_t ev;
    assert_int_equal(on_event_from_row(id, "u1", "order.updated", "{\"id\":1}", "1", &ev), 0);
    F.row(&ev, F.read_ud);
}

static void close_client(on_client_t *c)
{
    ws_on_close(NULL, c);
    uv_run(&loop, UV_RUN_DEFAULT);
    assert_int_equal(F.left, 1);
}

static void assert_sent(const int64_t *want, int n)
{
    assert_int_equal(F.nsent, n);
    for (int i = 0; i < n; i++)
        assert_int_equal(F.sent[i], want[i]);
}

static int setup(void **state)
{
    (void)state;
    memset(&F, 0, sizeof F);
    uv_loop_init(&loop);
    memset(&app, 0, sizeof app);
    app.loop = &loop;
    app.cfg.lookback_ms = 30000;
    app.cfg.ws_ping_interval_ms = 25000;
    app.registry = cm_metrics_new();
    app.m.ws_messages_sent = cm_metrics_counter(app.registry, "s_total", "s", NULL);
    app.m.ws_slow_closes = cm_metrics_counter(app.registry, "c_total", "c", NULL);
    app.m.resumes = cm_metrics_counter(app.registry, "r_total", "r", NULL);
    double b[] = {0.1};
    app.m.delivery_seconds = cm_metrics_histogram(app.registry, "d_seconds", "d", NULL, b, 1);
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    assert_int_equal(uv_loop_close(&loop), 0);
    cm_metrics_free(app.registry);
    assert_int_equal(cm_alloc_live(), 0);
    return 0;
}

/* ---- tests ---------------------------------------------------------------------------- */

/* Nothing before the welcome; then live events straight through. */
static void welcome_then_live(void **state)
{
    (void)state;
    on_client_t *c = client(-1, NULL, 0);
    assert_int_equal(F.nsent, 0); /* the hub starts it, not the join */
    F.sink.start(F.sink_ud);
    assert_true(F.started_ws); /* early messages are let through after the welcome */
    live(c, 5);
    live(c, 6);
    const int64_t want[] = {-1, 5, 6};
    assert_sent(want, 3);
    assert_int_equal(F.reads, 0);
    close_client(c);
}

/*
 * A resume from 10: the read finds 11, 12, 14; live 14 (in flight), 13 (a late committer), 15
 * and 12 (a re-publish) arrive meanwhile. One stream in id order, each once; later live copies
 * of replayed events (a new leader's catch-up) are dropped too.
 */
static void resume_merged_in_order(void **state)
{
    (void)state;
    on_client_t *c = client(10, NULL, 0);
    F.sink.start(F.sink_ud);
    assert_int_equal(F.reads, 1);
    assert_int_equal(F.q.after_id, 10);
    assert_string_equal(F.q.user_id, "u1");
    assert_int_equal(F.q.limit, 1000);
    live(c, 14);
    row(11);
    live(c, 13);
    row(12);
    row(14);
    live(c, 15);
    live(c, 12);
    F.done(0, 0, F.read_ud);
    live(c, 16);
    live(c, 12); /* re-published later: the client had it from its replay */
    live(c, 9);  /* below last_event_id */
    const int64_t want[] = {-1, 11, 12, 13, 14, 15, 16};
    assert_sent(want, 7);
    close_client(c);
}

/* recent_event_ids: the read starts at the smallest listed id and skips the listed ones (and
 * last_event_id itself), so only the late committers among them come. */
static void resume_with_recent_ids(void **state)
{
    (void)state;
    const int64_t recent[] = {7, 9};
    on_client_t *c = client(10, recent, 2);
    F.sink.start(F.sink_ud);
    assert_int_equal(F.q.after_id, 6);
    assert_int_equal(F.q.nskip, 3);
    assert_int_equal(F.skip[0], 7);
    assert_int_equal(F.skip[1], 9);
    assert_int_equal(F.skip[2], 10);
    row(8); /* committed late: the client never saw it */
    row(11);
    F.done(0, 0, F.read_ud);
    live(c, 8);  /* a live copy of it: once is enough */
    live(c, 9);  /* listed: the client has it */
    live(c, 12); /* new */
    const int64_t want[] = {-1, 8, 11, 12};
    assert_sent(want, 4);
    close_client(c);
}

/* A replay cut by the limit says so, after the rows it gave. */
static void truncated_resume_says_so(void **state)
{
    (void)state;
    on_client_t *c = client(0, NULL, 0);
    F.sink.start(F.sink_ud);
    row(1);
    row(2);
    F.done(0, 1, F.read_ud);
    const int64_t want[] = {-1, 1, 2, -3};
    assert_sent(want, 4);
    close_client(c);
}

/* The resume cannot be read: 1013, and what was held goes nowhere (no leak). */
static void failed_resume_closes(void **state)
{
    (void)state;
    on_client_t *c = client(3, NULL, 0);
    F.sink.start(F.sink_ud);
    live(c, 7);
    F.done(UV_EIO, 0, F.read_ud);
    assert_int_equal(F.closed_with, 1013);
    const int64_t want[] = {-1};
    assert_sent(want, 1);
    close_client(c);
}

/* Past WS_SEND_QUEUE_MAX_BYTES: closed with 1013 once, counted, nothing more sent. */
static void slow_consumer_closed(void **state)
{
    (void)state;
    on_client_t *c = client(-1, NULL, 0);
    F.sink.start(F.sink_ud);
    F.send_rc = UV_ENOBUFS;
    live(c, 1);
    assert_int_equal(F.closed_with, 1013);
    F.send_rc = 0;
    live(c, 2);
    const int64_t want[] = {-1, 1};
    assert_sent(want, 2);
    assert_int_equal((int)cm_metric_value(app.m.ws_slow_closes), 1);
    close_client(c);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(welcome_then_live, setup, teardown),
        cmocka_unit_test_setup_teardown(resume_merged_in_order, setup, teardown),
        cmocka_unit_test_setup_teardown(resume_with_recent_ids, setup, teardown),
        cmocka_unit_test_setup_teardown(truncated_resume_says_so, setup, teardown),
        cmocka_unit_test_setup_teardown(failed_resume_closes, setup, teardown),
        cmocka_unit_test_setup_teardown(slow_consumer_closed, setup, teardown),
    };
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    return rc || cm_alloc_live() != 0;
}
