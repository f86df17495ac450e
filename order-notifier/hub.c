#include "hub.h"

#include "client.h"

#include "cm/alloc.h"
#include "cm/buf.h"
#include "cm/log.h"

#include <cjson/cJSON.h>
#include <inttypes.h>
#include <libpq-fe.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define BUCKETS 4096
#define ALL_CHANNEL "orders:all"
/* Recent ids remembered per entry: covers the look-back of a catch-up for a busy user. */
#define SEEN_CAP 4096
/* Sync markers: resent every SYNC_RESEND_MS, given up after SYNC_GIVE_UP_MS (then the client
 * starts anyway; the replay after a Redis reconnect covers a link that was down). */
#define SYNC_TICK_MS 20
#define SYNC_RESEND_MS 200
#define SYNC_GIVE_UP_MS 3000
/* After the subscribing link is back, wait this long for the re-SUBSCRIBEs before replaying. */
#define REPLAY_DELAY_MS 200
#define REPLAY_RETRY_MS 1000
#define REPLAY_LIMIT 10000
#define QUERY_TIMEOUT_MS 5000

typedef struct on_hub_entry entry_t;
struct on_hub_entry {
    entry_t *bucket_next;
    entry_t *pending_prev, *pending_next; /* waiting for the sync marker */
    on_hub_t *hub;
    char *user_id; /* NULL for the all-users entry */
    char *channel;
    on_client_t *clients;
    size_t nclients;
    int ready;
    int pending;
    uint64_t sync_started_ms, sync_sent_ms;
    char token[96];
    on_idset_t seen;
};

struct on_hub {
    on_app_t *app;
    entry_t *buckets[BUCKETS];
    entry_t *all;
    entry_t *pending;
    on_client_t *clients; /* every joined client */
    size_t nclients;
    uint64_t sync_seq;
    uv_timer_t sync_timer;
    uv_timer_t replay_timer;
    int redis_was_up;
    double redis_down_at; /* on_now() when the subscribing link went down; 0 when up */
    double replay_since;  /* pending replay's lower bound (s), 0: none */
    int replay_inflight;
    int closing;
    int handles_open;
    void (*done)(void *ud);
    void *done_ud;
};

static uint64_t hash_str(const char *s)
{
    uint64_t h = 1469598103934665603ull;
    for (; *s; s++)
        h = (h ^ (unsigned char)*s) * 1099511628211ull;
    return h;
}

static entry_t **find_slot(on_hub_t *h, const char *user_id)
{
    entry_t **pp = &h->buckets[hash_str(user_id) % BUCKETS];
    while (*pp && strcmp((*pp)->user_id, user_id) != 0)
        pp = &(*pp)->bucket_next;
    return pp;
}

/* ---- sync markers ------------------------------------------------------------------------- */

static void pending_remove(on_hub_t *h, entry_t *e)
{
    if (!e->pending)
        return;
    if (e->pending_prev)
        e->pending_prev->pending_next = e->pending_next;
    else
        h->pending = e->pending_next;
    if (e->pending_next)
        e->pending_next->pending_prev = e->pending_prev;
    e->pending_prev = e->pending_next = NULL;
    e->pending = 0;
    if (!h->pending)
        uv_timer_stop(&h->sync_timer);
}

static void send_marker(on_hub_t *h, entry_t *e)
{
    char msg[128];
    int n = snprintf(msg, sizeof msg, "{\"sync\":\"%s\"}", e->token);
    const char *argv[3] = {"PUBLISH", e->channel, msg};
    size_t lens[3] = {7, strlen(e->channel), (size_t)n};
    e->sync_sent_ms = uv_now(h->app->loop);
    (void)cm_redis_command_argv(h->app->redis_pub, NULL, NULL, 3, argv, lens);
}

static void entry_ready(on_hub_t *h, entry_t *e)
{
    pending_remove(h, e);
    e->ready = 1;
    /* Starting a client may close it (a failed write): walk with a saved next. */
    on_client_t *c = e->clients;
    while (c) {
        on_client_t *next = c->entry_next;
        if (!c->started)
            on_client_start(c);
        c = next;
    }
}

static void sync_tick(uv_timer_t *t)
{
    on_hub_t *h = t->data;
    uint64_t now = uv_now(h->app->loop);
    entry_t *e = h->pending;
    while (e) {
        entry_t *next = e->pending_next;
        if (now - e->sync_started_ms >= SYNC_GIVE_UP_MS) {
            cm_log_warn("subscription not confirmed in time; starting clients anyway", "channel",
                        e->channel, NULL);
            entry_ready(h, e);
        } else if (now - e->sync_sent_ms >= SYNC_RESEND_MS) {
            send_marker(h, e);
        }
        e = next;
    }
}

/* ---- dispatch ----------------------------------------------------------------------------- */

/* Hands `ev` to every client of `e` unless `e` has seen its id. */
static void entry_dispatch(entry_t *e, const on_event_t *ev)
{
    int added = on_idset_add(&e->seen, ev->id);
    if (added == 0)
        return;
    cm_buf_t b = CM_BUF_INIT;
    if (on_event_frame(ev, &b) != 0) {
        cm_buf_free(&b);
        cm_log_error("cannot build a frame", "error", "out of memory", NULL);
        return;
    }
    on_frame_t *f = on_frame_new(ev->id, ev->created_at, b.data, b.len);
    cm_buf_free(&b);
    if (!f)
        return;
    on_client_t *c = e->clients;
    while (c) {
        on_client_t *next = c->entry_next;
        if (c->started)
            on_client_deliver(c, f);
        c = next;
    }
    on_frame_unref(f);
}

void on_hub_message(cm_redis_t *r, const char *channel, const char *payload, size_t len, void *ud)
{
    (void)r;
    (void)channel;
    entry_t *e = ud;
    if (len > 8 && memcmp(payload, "{\"sync\":", 8) == 0) {
        if (e->pending) {
            cJSON *j = cJSON_ParseWithLength(payload, len);
            const cJSON *tok = cJSON_GetObjectItemCaseSensitive(j, "sync");
            if (cJSON_IsString(tok) && strcmp(tok->valuestring, e->token) == 0)
                entry_ready(e->hub, e);
            cJSON_Delete(j);
        }
        return; /* another replica's marker, or ours again */
    }
    on_event_t ev;
    if (on_event_parse(payload, len, &ev) != 0) {
        cm_log_warn("ignoring a malformed pub/sub message", "channel", channel, NULL);
        return;
    }
    entry_dispatch(e, &ev);
    on_event_clear(&ev);
}

/* ---- membership --------------------------------------------------------------------------- */

static entry_t *entry_new(on_hub_t *h, const char *user_id)
{
    entry_t *e = cm_calloc(1, sizeof *e);
    if (!e)
        return NULL;
    e->hub = h;
    cm_buf_t chan = CM_BUF_INIT;
    if (user_id) {
        e->user_id = cm_strdup(user_id);
        if (!e->user_id || on_event_channel(user_id, &chan) != 0)
            goto fail;
        e->channel = cm_buf_steal(&chan);
    } else {
        e->channel = cm_strdup(ALL_CHANNEL);
    }
    if (!e->channel)
        goto fail;
    on_idset_init(&e->seen, SEEN_CAP);
    snprintf(e->token, sizeof e->token, "%s:%" PRIu64, h->app->instance, ++h->sync_seq);
    if (cm_redis_subscribe(h->app->redis_sub, e->channel, on_hub_message, e) != 0)
        goto fail;
    /* Wait for our marker to come back through the subscription. */
    e->pending = 1;
    e->pending_next = h->pending;
    if (h->pending)
        h->pending->pending_prev = e;
    h->pending = e;
    e->sync_started_ms = uv_now(h->app->loop);
    send_marker(h, e);
    if (!uv_is_active((uv_handle_t *)&h->sync_timer))
        uv_timer_start(&h->sync_timer, sync_tick, SYNC_TICK_MS, SYNC_TICK_MS);
    return e;
fail:
    cm_buf_free(&chan);
    cm_free(e->user_id);
    cm_free(e->channel);
    cm_free(e);
    return NULL;
}

static void entry_free(on_hub_t *h, entry_t *e)
{
    pending_remove(h, e);
    (void)cm_redis_unsubscribe(h->app->redis_sub, e->channel);
    if (e->user_id) {
        entry_t **pp = find_slot(h, e->user_id);
        if (*pp == e)
            *pp = e->bucket_next;
    } else {
        h->all = NULL;
    }
    on_idset_free(&e->seen);
    cm_free(e->user_id);
    cm_free(e->channel);
    cm_free(e);
}

/* A zero-delay start for clients joining a ready entry: on_client_start never runs inside
 * on_hub_join. Reuses the client's ping timer, which the client re-arms when it starts. */
static void start_later(uv_timer_t *t)
{
    on_client_t *c = t->data;
    if (!c->started && !c->closing)
        on_client_start(c);
}

int on_hub_join(on_hub_t *h, on_client_t *c)
{
    entry_t *e;
    if (c->claims.read_all) {
        if (!h->all && !(h->all = entry_new(h, NULL)))
            return UV_ENOMEM;
        e = h->all;
    } else {
        entry_t **pp = find_slot(h, c->claims.sub);
        if (!*pp && !(*pp = entry_new(h, c->claims.sub)))
            return UV_ENOMEM;
        e = *pp;
    }
    c->entry = e;
    c->entry_prev = NULL;
    c->entry_next = e->clients;
    if (e->clients)
        e->clients->entry_prev = c;
    e->clients = c;
    e->nclients++;
    c->all_prev = NULL;
    c->all_next = h->clients;
    if (h->clients)
        h->clients->all_prev = c;
    h->clients = c;
    h->nclients++;
    if (e->ready)
        uv_timer_start(&c->ping_timer, start_later, 0, 0);
    return 0;
}

void on_hub_leave(on_hub_t *h, on_client_t *c)
{
    entry_t *e = c->entry;
    if (!e)
        return;
    if (c->entry_prev)
        c->entry_prev->entry_next = c->entry_next;
    else
        e->clients = c->entry_next;
    if (c->entry_next)
        c->entry_next->entry_prev = c->entry_prev;
    if (c->all_prev)
        c->all_prev->all_next = c->all_next;
    else
        h->clients = c->all_next;
    if (c->all_next)
        c->all_next->all_prev = c->all_prev;
    c->entry = NULL;
    c->entry_prev = c->entry_next = c->all_prev = c->all_next = NULL;
    h->nclients--;
    if (--e->nclients == 0)
        entry_free(h, e);
}

size_t on_hub_clients(const on_hub_t *h)
{
    return h->nclients;
}

void on_hub_close_all(on_hub_t *h, uint16_t code)
{
    on_client_t *c = h->clients;
    while (c) {
        on_client_t *next = c->all_next;
        on_client_close(c, code);
        c = next;
    }
}

/* ---- replay after a Redis reconnect ------------------------------------------------------- */

static void replay_run(uv_timer_t *t);
static void release(on_hub_t *h);

static void replay_done(cm_pg_t *pg, const PGresult *res, const char *error, void *ud)
{
    (void)pg;
    on_hub_t *h = ud;
    h->replay_inflight = 0;
    if (h->closing) {
        release(h);
        return;
    }
    h->handles_open--;
    if (error) {
        cm_log_warn("replay after the Redis reconnect failed; retrying", "error", error, NULL);
        uv_timer_start(&h->replay_timer, replay_run, REPLAY_RETRY_MS, 0);
        return;
    }
    int n = PQntuples(res);
    for (int i = 0; i < n; i++) {
        on_event_t ev;
        int64_t id = strtoll(PQgetvalue(res, i, 0), NULL, 10);
        if (on_event_from_row(id, PQgetvalue(res, i, 1), PQgetvalue(res, i, 2),
                              PQgetvalue(res, i, 3),
                              PQgetisnull(res, i, 4) ? NULL : PQgetvalue(res, i, 4), &ev) != 0)
            continue;
        entry_t *e = *find_slot(h, ev.user_id);
        if (e)
            entry_dispatch(e, &ev);
        if (h->all)
            entry_dispatch(h->all, &ev);
        cm_counter_inc(h->app->m.redis_replays);
        on_event_clear(&ev);
    }
    h->replay_since = 0;
    char count[16];
    snprintf(count, sizeof count, "%d", n);
    cm_log_info("replayed the outbox after a Redis reconnect", "rows", count, NULL);
}

static void replay_run(uv_timer_t *t)
{
    on_hub_t *h = t->data;
    if (h->closing || h->replay_inflight || h->replay_since <= 0)
        return;
    if (h->nclients == 0) {
        h->replay_since = 0;
        return;
    }
    /* Users of this replica as a JSON array (NULL: everyone, for an orders:read:all socket). */
    char *users = NULL;
    if (!h->all) {
        cJSON *arr = cJSON_CreateArray();
        for (size_t b = 0; arr && b < BUCKETS; b++)
            for (entry_t *e = h->buckets[b]; e; e = e->bucket_next)
                cJSON_AddItemToArray(arr, cJSON_CreateString(e->user_id));
        users = arr ? cJSON_PrintUnformatted(arr) : NULL;
        cJSON_Delete(arr);
        if (!users) {
            uv_timer_start(&h->replay_timer, replay_run, REPLAY_RETRY_MS, 0);
            return;
        }
    }
    char since[32], limit[16];
    snprintf(since, sizeof since, "%.6f", h->replay_since);
    snprintf(limit, sizeof limit, "%d", REPLAY_LIMIT);
    const char *params[3] = {since, users, limit};
    int rc = cm_pg_query(h->app->pg,
                         "SELECT id::text, user_id, event_type, payload::text, "
                         "extract(epoch FROM created_at)::text FROM order_events "
                         "WHERE created_at >= to_timestamp($1::float8) AND ($2::jsonb IS NULL "
                         "OR user_id IN (SELECT jsonb_array_elements_text($2::jsonb))) "
                         "ORDER BY order_events.id LIMIT $3::int",
                         3, params, QUERY_TIMEOUT_MS, replay_done, h);
    cJSON_free(users);
    if (rc != 0) {
        uv_timer_start(&h->replay_timer, replay_run, REPLAY_RETRY_MS, 0);
        return;
    }
    h->replay_inflight = 1;
    h->handles_open++;
}

void on_hub_redis_state(on_hub_t *h, int up)
{
    if (h->closing)
        return;
    if (!up) {
        if (h->redis_down_at == 0)
            h->redis_down_at = on_now();
        return;
    }
    if (h->redis_was_up && h->redis_down_at > 0) {
        double since = h->redis_down_at - (double)h->app->cfg.lookback_ms / 1000.0;
        if (h->replay_since == 0 || since < h->replay_since)
            h->replay_since = since;
        uv_timer_start(&h->replay_timer, replay_run, REPLAY_DELAY_MS, 0);
    }
    h->redis_was_up = 1;
    h->redis_down_at = 0;
}

/* ---- life ----------------------------------------------------------------------------------- */

int on_hub_new(on_app_t *app, on_hub_t **out)
{
    on_hub_t *h = cm_calloc(1, sizeof *h);
    if (!h)
        return UV_ENOMEM;
    h->app = app;
    uv_timer_init(app->loop, &h->sync_timer);
    uv_timer_init(app->loop, &h->replay_timer);
    h->sync_timer.data = h;
    h->replay_timer.data = h;
    h->handles_open = 2;
    *out = h;
    return 0;
}

/* Drops one of the things that borrow the hub (its timers, a replay query). */
static void release(on_hub_t *h)
{
    if (--h->handles_open == 0) {
        void (*done)(void *) = h->done;
        void *ud = h->done_ud;
        cm_free(h);
        if (done)
            done(ud);
    }
}

static void hub_handle_closed(uv_handle_t *handle)
{
    release(handle->data);
}

void on_hub_close(on_hub_t *h, void (*done)(void *ud), void *ud)
{
    h->closing = 1;
    h->done = done;
    h->done_ud = ud;
    /* Entries go with their last client; whatever is left (none after a clean stop) goes now. */
    for (size_t b = 0; b < BUCKETS; b++)
        while (h->buckets[b])
            entry_free(h, h->buckets[b]);
    if (h->all)
        entry_free(h, h->all);
    uv_close((uv_handle_t *)&h->sync_timer, hub_handle_closed);
    uv_close((uv_handle_t *)&h->replay_timer, hub_handle_closed);
}
