#include "hub.h"

#include "gate.h"
#include "outbox.h"

#include "cm/alloc.h"
#include "cm/buf.h"
#include "cm/log.h"

#include <cjson/cJSON.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define BUCKETS 4096
#define ALL_CHANNEL "orders:all"
/* Ids are remembered per entry this much longer than the look-back of a catch-up or replay
 * (the time those take, and clock differences between replicas and Postgres). */
#define SEEN_MARGIN_MS 15000
/* Hard bound of that memory (ids per entry), far above what a look-back window holds. */
#define SEEN_CAP (8u << 20)
/* Sync markers: resent every SYNC_RESEND_MS, given up after SYNC_GIVE_UP_MS (then the client
 * starts anyway; the replay after a Redis reconnect covers a link that was down). */
#define SYNC_TICK_MS 20
#define SYNC_RESEND_MS 200
#define SYNC_GIVE_UP_MS 3000
/* After the subscribing link is back, wait this long for the re-SUBSCRIBEs before replaying. */
#define REPLAY_RETRY_MS 1000

typedef struct on_hub_entry entry_t;

struct on_hub_member {
    entry_t *entry;
    on_hub_member_t *entry_prev, *entry_next; /* in entry->members */
    on_hub_member_t *all_prev, *all_next;     /* in hub->members */
    on_hub_member_t *start_prev, *start_next; /* in hub->starting */
    int queued;                               /* in hub->starting */
    int started;
    on_hub_sink_t sink;
    void *ud;
};
struct on_hub_entry {
    entry_t *bucket_next;
    entry_t *pending_prev, *pending_next; /* waiting for the sync marker */
    on_hub_t *hub;
    char *user_id; /* NULL for the all-users entry */
    char *channel;
    on_hub_member_t *members;
    size_t nmembers;
    int ready;
    int pending;
    uint64_t sync_started_ms, sync_sent_ms;
    char token[96];
    on_idset_t seen;
    on_ordermap_t orders; /* the last event delivered per order */
    on_gate_t gate;       /* live events held while a replay is merged in */
};

struct on_hub {
    on_app_t *app;
    entry_t *buckets[BUCKETS];
    entry_t *all;
    entry_t *pending;
    on_hub_member_t *members; /* every joined client */
    size_t nmembers;
    on_hub_member_t *starting; /* joined a ready entry: started by start_timer */
    uv_timer_t start_timer;
    uint64_t sync_seq;
    uv_timer_t sync_timer;
    uv_timer_t replay_timer;
    int redis_was_up;
    double redis_down_at; /* on_now() when the subscribing link went down; 0 when up */
    double replay_since;  /* pending replay's lower bound (s), 0: none */
    int replay_inflight;  /* the confirming PING or the outbox read */
    int replay_again;     /* the link went down again during the replay */
    double replay_running_since;
    cm_buf_t last_msg;      /* the last event message from Redis... */
    on_frame_t *last_frame; /* ...and its frame (one reference) */
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
    on_hub_member_t *m = e->members;
    while (m) {
        on_hub_member_t *next = m->entry_next;
        if (!m->started) {
            m->started = 1;
            m->sink.start(m->ud);
        }
        m = next;
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

static on_frame_t *frame_of(const on_event_t *ev)
{
    on_frame_t *f = on_frame_from_event(ev);
    if (!f)
        cm_log_error("cannot build a frame", "error", "out of memory", NULL);
    return f;
}

/* Hands `f` to every started client of `e` unless `e` has delivered its id already. */
static void entry_deliver(entry_t *e, on_frame_t *f)
{
    uint64_t now = uv_now(e->hub->app->loop);
    if (on_idset_add(&e->seen, f->id, now) == 0)
        return;
    /* A replay or a catch-up reaches back past what this entry's sockets are owed: an event
     * below one already delivered for its order would put the order back in time. */
    if (on_ordermap_check(&e->orders, f->order_id, f->id, now) == 0)
        return;
    on_hub_member_t *m = e->members;
    while (m) {
        on_hub_member_t *next = m->entry_next;
        if (m->started)
            m->sink.deliver(m->ud, f);
        m = next;
    }
}

static void held_emit(int64_t id, void *data, void *ud)
{
    (void)id;
    entry_deliver(ud, data);
    on_frame_unref(data);
}

static void held_drop(void *data)
{
    on_frame_unref(data);
}

/* A live event for `e` (`f` borrowed): delivered now, or held while a replay is merged in
 * front of it. */
static void entry_dispatch(entry_t *e, on_frame_t *f)
{
    if (!on_gate_holding(&e->gate)) {
        entry_deliver(e, f);
        return;
    }
    on_frame_ref(f);
    int rc = on_gate_live(&e->gate, f->id, f);
    if (rc == 0)
        return; /* held */
    if (rc != ON_GATE_DUP)
        entry_deliver(e, f);
    on_frame_unref(f);
}

/* A replayed row for `e` (rows in id order): what was held below it goes first. */
static void entry_replay_row(entry_t *e, const on_event_t *ev)
{
    if (!on_gate_holding(&e->gate))
        return; /* joined after the link came back: nothing of before is owed to it */
    if (on_gate_row(&e->gate, ev->id, held_emit, held_drop, e) == 0)
        return;
    if (on_idset_has(&e->seen, ev->id))
        return;
    on_frame_t *f = frame_of(ev);
    if (f) {
        cm_counter_inc(e->hub->app->m.redis_replays);
        entry_deliver(e, f);
        on_frame_unref(f);
    }
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
    /* The leader publishes each event to its user's channel and to orders:all back to back:
     * the second copy reuses the frame decoded and encoded for the first. */
    on_hub_t *h = e->hub;
    on_frame_t *f = h->last_frame;
    if (f && h->last_msg.len == len && memcmp(h->last_msg.data, payload, len) == 0) {
        entry_dispatch(e, f);
        return;
    }
    int64_t id, order_id;
    double at;
    const char *frame;
    size_t frame_len;
    if (on_event_envelope_parse(payload, len, &id, &at, &order_id, &frame, &frame_len) == 0) {
        /* The leader's frame goes out as it is: no decoding here. */
        f = on_frame_new(id, at, frame, frame_len);
        if (f)
            f->order_id = order_id;
    } else {
        /* The JSON message of an older leader (during an upgrade). */
        on_event_t ev;
        if (on_event_parse(payload, len, &ev) != 0) {
            cm_log_warn("ignoring a malformed pub/sub message", "channel", channel, NULL);
            return;
        }
        f = frame_of(&ev);
        on_event_clear(&ev);
    }
    if (!f)
        return;
    on_frame_unref(h->last_frame);
    h->last_frame = NULL;
    cm_buf_reset(&h->last_msg);
    if (cm_buf_append(&h->last_msg, payload, len) == 0)
        h->last_frame = f;
    entry_dispatch(e, f);
    if (!h->last_frame)
        on_frame_unref(f);
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
    on_idset_init(&e->seen, SEEN_CAP, (uint64_t)h->app->cfg.lookback_ms + SEEN_MARGIN_MS);
    on_ordermap_init(&e->orders, (uint64_t)h->app->cfg.lookback_ms + SEEN_MARGIN_MS);
    on_gate_init(&e->gate);
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
    on_ordermap_free(&e->orders);
    on_gate_free(&e->gate, held_drop);
    cm_free(e->user_id);
    cm_free(e->channel);
    cm_free(e);
}

static void starting_remove(on_hub_t *h, on_hub_member_t *m)
{
    if (!m->queued)
        return;
    if (m->start_prev)
        m->start_prev->start_next = m->start_next;
    else
        h->starting = m->start_next;
    if (m->start_next)
        m->start_next->start_prev = m->start_prev;
    m->start_prev = m->start_next = NULL;
    m->queued = 0;
}

/* Clients that joined an entry whose subscription was in effect already start here, from the
 * loop: never inside on_hub_join. */
static void start_queued(uv_timer_t *t)
{
    on_hub_t *h = t->data;
    on_hub_member_t *m;
    while ((m = h->starting) != NULL) {
        starting_remove(h, m);
        if (!m->started) {
            m->started = 1;
            m->sink.start(m->ud);
        }
    }
}

int on_hub_join(on_hub_t *h, const char *user_id, int read_all, const on_hub_sink_t *sink, void *ud,
                on_hub_member_t **out)
{
    on_hub_member_t *m = cm_calloc(1, sizeof *m);
    if (!m)
        return UV_ENOMEM;
    entry_t *e;
    if (read_all) {
        if (!h->all && !(h->all = entry_new(h, NULL))) {
            cm_free(m);
            return UV_ENOMEM;
        }
        e = h->all;
    } else {
        entry_t **pp = find_slot(h, user_id);
        if (!*pp && !(*pp = entry_new(h, user_id))) {
            cm_free(m);
            return UV_ENOMEM;
        }
        e = *pp;
    }
    m->sink = *sink;
    m->ud = ud;
    m->entry = e;
    m->entry_next = e->members;
    if (e->members)
        e->members->entry_prev = m;
    e->members = m;
    e->nmembers++;
    m->all_next = h->members;
    if (h->members)
        h->members->all_prev = m;
    h->members = m;
    h->nmembers++;
    if (e->ready) {
        m->queued = 1;
        m->start_next = h->starting;
        if (h->starting)
            h->starting->start_prev = m;
        h->starting = m;
        uv_timer_start(&h->start_timer, start_queued, 0, 0);
    }
    *out = m;
    return 0;
}

void on_hub_leave(on_hub_t *h, on_hub_member_t *m)
{
    if (!m)
        return;
    entry_t *e = m->entry;
    starting_remove(h, m);
    if (m->entry_prev)
        m->entry_prev->entry_next = m->entry_next;
    else
        e->members = m->entry_next;
    if (m->entry_next)
        m->entry_next->entry_prev = m->entry_prev;
    if (m->all_prev)
        m->all_prev->all_next = m->all_next;
    else
        h->members = m->all_next;
    if (m->all_next)
        m->all_next->all_prev = m->all_prev;
    cm_free(m);
    h->nmembers--;
    if (--e->nmembers == 0)
        entry_free(h, e);
}

size_t on_hub_clients(const on_hub_t *h)
{
    return h->nmembers;
}

void on_hub_close_all(on_hub_t *h, uint16_t code)
{
    on_hub_member_t *m = h->members;
    while (m) {
        on_hub_member_t *next = m->all_next;
        m->sink.close(m->ud, code);
        m = next;
    }
}

/* ---- replay after a Redis reconnect ------------------------------------------------------- */

/*
 * While the subscribing link was down, events published meanwhile never reached this replica.
 * Once it is back, every entry holds its live events; a PING on the subscribing link confirms
 * that the re-SUBSCRIBEs are in effect (Redis answers in order), so anything published from
 * then on arrives live; then the outbox is read from the outage's start minus the look-back
 * for the users of this replica (everyone's when an orders:read:all client is here), and each
 * entry merges the rows with what it held (gate.h). An entry's id set drops what it had.
 */

static void replay_run(uv_timer_t *t);
static void release(on_hub_t *h);

/* Every entry starts holding its live events (hold = 1), or releases them (hold = 0). */
static void gate_all(on_hub_t *h, int hold)
{
    for (size_t b = 0; b < BUCKETS; b++)
        for (entry_t *e = h->buckets[b]; e; e = e->bucket_next) {
            if (hold)
                on_gate_hold(&e->gate);
            else if (on_gate_holding(&e->gate))
                on_gate_release(&e->gate, held_emit, held_drop, e);
        }
    if (h->all && hold)
        on_gate_hold(&h->all->gate);
    else if (h->all && on_gate_holding(&h->all->gate))
        on_gate_release(&h->all->gate, held_emit, held_drop, h->all);
}

static void replay_row(on_event_t *ev, void *ud)
{
    on_hub_t *h = ud;
    if (!h->closing) {
        entry_t *e = *find_slot(h, ev->user_id);
        if (e)
            entry_replay_row(e, ev);
        if (h->all)
            entry_replay_row(h->all, ev);
    }
    on_event_clear(ev);
}

static void replay_done(int status, int truncated, void *ud)
{
    (void)truncated;
    on_hub_t *h = ud;
    h->replay_inflight = 0;
    if (h->closing) {
        release(h);
        return;
    }
    h->handles_open--;
    if (status != 0 || h->replay_again) {
        if (status != 0)
            cm_log_warn("replay after the Redis reconnect failed; retrying", "error",
                        uv_strerror(status), NULL);
        /* Entries keep holding: the next try merges in front of what they hold. */
        h->replay_again = 0;
        uv_timer_start(&h->replay_timer, replay_run, status != 0 ? REPLAY_RETRY_MS : 0, 0);
        return;
    }
    if (h->replay_since >= h->replay_running_since)
        h->replay_since = 0;
    gate_all(h, 0);
    cm_log_info("replayed the outbox after a Redis reconnect", NULL);
}

static void replay_read(on_hub_t *h)
{
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
    h->replay_running_since = h->replay_since;
    on_outbox_query_t q = {.since = h->replay_since, .users_json = users};
    int rc = on_outbox_read(h->app->pg, &q, replay_row, replay_done, h, NULL);
    cJSON_free(users);
    if (rc != 0) {
        uv_timer_start(&h->replay_timer, replay_run, REPLAY_RETRY_MS, 0);
        return;
    }
    h->replay_inflight = 1;
    h->handles_open++;
}

static void replay_ping_done(cm_redis_t *r, int status, double latency_ms, void *ud)
{
    (void)r;
    (void)latency_ms;
    on_hub_t *h = ud;
    h->replay_inflight = 0;
    if (h->closing) {
        release(h);
        return;
    }
    h->handles_open--;
    if (status != CM_REDIS_OK) {
        uv_timer_start(&h->replay_timer, replay_run, REPLAY_RETRY_MS, 0);
        return;
    }
    replay_read(h);
}

static void replay_run(uv_timer_t *t)
{
    on_hub_t *h = t->data;
    if (h->closing || h->replay_inflight || h->replay_since <= 0)
        return;
    if (h->nmembers == 0) {
        gate_all(h, 0);
        h->replay_since = 0;
        return;
    }
    if (!cm_redis_is_up(h->app->redis_sub))
        return; /* the next up starts over */
    gate_all(h, 1);
    if (cm_redis_ping(h->app->redis_sub, replay_ping_done, h) != 0) {
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
        if (h->replay_inflight)
            h->replay_again = 1;
        return;
    }
    if (h->redis_was_up && h->redis_down_at > 0) {
        double since = h->redis_down_at - (double)h->app->cfg.lookback_ms / 1000.0;
        if (h->replay_since == 0 || since < h->replay_since)
            h->replay_since = since;
        /* Hold from now on: events that arrive before the replay must not overtake it. */
        gate_all(h, 1);
        uv_timer_start(&h->replay_timer, replay_run, 0, 0);
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
    uv_timer_init(app->loop, &h->start_timer);
    h->sync_timer.data = h;
    h->replay_timer.data = h;
    h->start_timer.data = h;
    h->handles_open = 3;
    *out = h;
    return 0;
}

/* Drops one of the things that borrow the hub (its timers, a replay query). */
static void release(on_hub_t *h)
{
    if (--h->handles_open == 0) {
        on_frame_unref(h->last_frame);
        cm_buf_free(&h->last_msg);
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
    uv_close((uv_handle_t *)&h->start_timer, hub_handle_closed);
}
