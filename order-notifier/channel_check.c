#include "channel_check.h"

#include "cm/alloc.h"
#include "cm/error.h"
#include "cm/log.h"
#include "cm/utf8.h"

#include <libpq-fe.h>
#include <stdio.h>
#include <string.h>

#define QUERY_TIMEOUT_MS 5000

typedef enum { CC_UNKNOWN = 0, CC_MATCH, CC_MISMATCH } cc_state_t;

struct on_channel_check {
    cm_pg_t *pg;
    const char *channel;
    uv_timer_t retry;
    cc_state_t state;
    int inflight; /* a query's callback is still to come (it borrows this struct) */
    int again;    /* run was asked while a query was in flight: ask once more after it */
    int closing;
    int timer_open;
    char problem[384];
};

static void maybe_free(on_channel_check_t *cc)
{
    if (cc->closing && !cc->inflight && !cc->timer_open)
        cm_free(cc);
}

static void timer_closed(uv_handle_t *h)
{
    on_channel_check_t *cc = h->data;
    cc->timer_open = 0;
    maybe_free(cc);
}

static void ask(on_channel_check_t *cc);

static void retry_fired(uv_timer_t *t)
{
    ask(t->data);
}

/* The database's value for a message: cut, controls and bytes that are not UTF-8 as '?', so
 * /readyz stays one valid JSON line whatever the setting holds. */
static void printable(char *dst, size_t dstsz, const char *s)
{
    size_t n = 0, len = strlen(s);
    for (size_t i = 0; i < len && n + 5 < dstsz;) {
        size_t k = cm_utf8_seq_len(s + i, len - i);
        if (k > 1 && n + k + 4 < dstsz) {
            memcpy(dst + n, s + i, k);
            n += k;
            i += k;
            continue;
        }
        unsigned char ch = (unsigned char)s[i];
        dst[n++] = (k == 0 || ch < 0x20 || ch == 0x7f) ? '?' : (char)ch;
        i += k ? k : 1;
    }
    if (n + 5 >= dstsz && n < len) {
        memcpy(dst + n, "...", 3);
        n += 3;
    }
    dst[n] = '\0';
}

static void answered(cm_pg_t *pg, const PGresult *res, int err, void *ud)
{
    on_channel_check_t *cc = ud;
    cc->inflight = 0;
    if (cc->closing) {
        maybe_free(cc);
        return;
    }
    if (err || !res || PQntuples(res) != 1 || PQnfields(res) != 1 || PQgetisnull(res, 0, 0)) {
        cm_log_warn("cannot read markets.order_channel; asking again", "error",
                    err ? cm_strerror(err) : "unexpected result", "detail", cm_pg_error_detail(pg),
                    NULL);
        uv_timer_start(&cc->retry, retry_fired, ON_CHANNEL_CHECK_RETRY_MS, 0);
        return;
    }
    const char *db = PQgetvalue(res, 0, 0);
    cc_state_t was = cc->state;
    if (strcmp(db, cc->channel) == 0) {
        cc->state = CC_MATCH;
        cc->problem[0] = '\0';
        if (was == CC_MISMATCH)
            cm_log_info("PG_CHANNEL matches the trigger's channel again", "channel", db, NULL);
    } else {
        char shown[128];
        printable(shown, sizeof shown, db);
        cc->state = CC_MISMATCH;
        snprintf(cc->problem, sizeof cc->problem,
                 "PG_CHANNEL '%s' is not the channel the trigger notifies ('%s', from the "
                 "database setting markets.order_channel): no live event would arrive",
                 cc->channel, shown);
        /* Said once per change, not at every reconnect of a session that stays wrong. */
        if (was != CC_MISMATCH)
            cm_log_error("PG_CHANNEL does not match the trigger's channel: not ready", "pg_channel",
                         cc->channel, "order_channel", db, "fix",
                         "set PG_CHANNEL to it, or ALTER DATABASE ... SET markets.order_channel",
                         NULL);
    }
    if (cc->again) {
        cc->again = 0;
        ask(cc);
    }
}

static void ask(on_channel_check_t *cc)
{
    if (cc->closing)
        return;
    if (cc->inflight) {
        cc->again = 1;
        return;
    }
    int rc = cm_pg_query(cc->pg, ON_CHANNEL_CHECK_SQL, 0, NULL, QUERY_TIMEOUT_MS, answered, cc);
    if (rc == 0) {
        cc->inflight = 1;
        uv_timer_stop(&cc->retry);
    } else {
        /* No pool connection yet (it connects alongside the LISTEN session), or busy. */
        uv_timer_start(&cc->retry, retry_fired, ON_CHANNEL_CHECK_RETRY_MS, 0);
    }
}

int on_channel_check_new(uv_loop_t *loop, cm_pg_t *pg, const char *channel,
                         on_channel_check_t **out)
{
    on_channel_check_t *cc = cm_calloc(1, sizeof *cc);
    if (!cc)
        return UV_ENOMEM;
    cc->pg = pg;
    cc->channel = channel;
    uv_timer_init(loop, &cc->retry);
    cc->retry.data = cc;
    cc->timer_open = 1;
    snprintf(cc->problem, sizeof cc->problem,
             "PG_CHANNEL not checked yet against markets.order_channel");
    *out = cc;
    return 0;
}

void on_channel_check_run(on_channel_check_t *cc)
{
    if (cc)
        ask(cc);
}

const char *on_channel_check_problem(const on_channel_check_t *cc)
{
    if (!cc || cc->state == CC_MATCH)
        return NULL;
    return cc->problem;
}

void on_channel_check_close(on_channel_check_t *cc)
{
    if (!cc || cc->closing)
        return;
    cc->closing = 1;
    uv_timer_stop(&cc->retry);
    uv_close((uv_handle_t *)&cc->retry, timer_closed);
}
