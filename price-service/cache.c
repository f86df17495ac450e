/* The price cache's lifecycle: creation with its metrics, settings reloads, stats, keys. */
#include "cache_impl.h"

#include "cm/log.h"
#include "cm/utf8.h"

#include <cjson/cJSON.h>
#include <string.h>

int ps_cache_value_ok(const char *market, const char *val, size_t len)
{
    if (len == 0)
        return 1; /* the negative entry: the market does not exist */
    const char *end = NULL;
    cJSON *j = len <= PS_CACHE_VALUE_MAX && cm_utf8_valid(val, len)
                   ? cJSON_ParseWithLengthOpts(val, len, &end, 0)
                   : NULL;
    const cJSON *m = cJSON_GetObjectItemCaseSensitive(j, "market");
    /* The single-market answer is these very bytes: the whole value must be the object. */
    int ok = cJSON_IsObject(j) && end == val + len && cJSON_IsString(m) &&
             strcmp(m->valuestring, market) == 0 &&
             cJSON_IsString(cJSON_GetObjectItemCaseSensitive(j, "price"));
    cJSON_Delete(j);
    if (!ok)
        cm_log_warn("cached price is not this market's price object; answering from the "
                    "origin, which replaces it",
                    "market", market, NULL);
    return ok;
}

void ps_cache_key(const char *market, char *out)
{
    memcpy(out, "price:v1:", 9);
    size_t len = strnlen(market, PS_MARKET_MAX);
    memcpy(out + 9, market, len);
    out[9 + len] = '\0';
}

void ps_cache_lock_key(const char *market, char *out)
{
    memcpy(out, "price:lock:v1:", 14);
    size_t len = strnlen(market, PS_MARKET_MAX);
    memcpy(out + 14, market, len);
    out[14 + len] = '\0';
}

static double hit_ratio(void *ud)
{
    const ps_cache_t *c = ud;
    double total = (double)(c->stats.hits + c->stats.misses + c->stats.errors);
    return total > 0 ? (double)c->stats.hits / total : 0.0;
}

ps_cache_t *ps_cache_new(uv_loop_t *loop, const ps_cache_backend_t *backend,
                         const ps_cache_settings_t *settings, struct cm_metrics *metrics)
{
    ps_cache_t *c = cm_calloc(1, sizeof *c);
    if (!c)
        return NULL;
    if (ps_cache_ready_init(c, loop) != 0) {
        cm_free(c);
        return NULL;
    }
    c->be = *backend;
    c->set = *settings;
    if (metrics) {
        const char *name = "price_cache_lookups_total";
        const char *help = "Price cache lookups by result (hit includes memory-tier hits).";
        c->m_hit = cm_metrics_counter(metrics, name, help, "result=\"hit\"");
        c->m_miss = cm_metrics_counter(metrics, name, help, "result=\"miss\"");
        c->m_error = cm_metrics_counter(metrics, name, help, "result=\"error\"");
        c->m_bypass = cm_metrics_counter(metrics, name, help, "result=\"bypass\"");
        c->m_memory_hit = cm_metrics_counter(
            metrics, "price_cache_memory_hits_total",
            "Hits answered from the in-process copy of a Redis entry, before its expiry.", NULL);
        c->m_collapsed = cm_metrics_counter(
            metrics, "price_cache_collapsed_total",
            "Lookups that shared another lookup's origin fetch (single-flight).", NULL);
        cm_metrics_gauge_fn(metrics, "price_cache_hit_ratio",
                            "Hits / (hits + misses + errors) since start.", NULL, hit_ratio, c);
        name = "price_cache_refreshes_total";
        help = "Refresh-ahead attempts by result: ok (entry replaced), error (lock, origin or SET "
               "failed), lock_lost (another replica refreshes).";
        c->m_refresh_ok = cm_metrics_counter(metrics, name, help, "result=\"ok\"");
        c->m_refresh_error = cm_metrics_counter(metrics, name, help, "result=\"error\"");
        c->m_refresh_lost = cm_metrics_counter(metrics, name, help, "result=\"lock_lost\"");
        name = "price_cache_refresh_lock_total";
        help = "Refresh locks asked of Redis by result: won, lost (held by another replica), "
               "error (Redis failed).";
        c->m_lock_won = cm_metrics_counter(metrics, name, help, "result=\"won\"");
        c->m_lock_lost = cm_metrics_counter(metrics, name, help, "result=\"lost\"");
        c->m_lock_error = cm_metrics_counter(metrics, name, help, "result=\"error\"");
        c->m_stale = cm_metrics_counter(
            metrics, "price_cache_stale_total",
            "Answers of a value past its expiry because the origin failed (stale-if-error).", NULL);
    }
    return c;
}

void ps_cache_configure(ps_cache_t *c, const ps_cache_settings_t *settings)
{
    if (settings->enabled != c->set.enabled || settings->ttl_ms != c->set.ttl_ms ||
        settings->memory_enabled != c->set.memory_enabled)
        ps_cache_mem_clear(c);
    if (!settings->enabled || !settings->stale_if_error_ms)
        ps_cache_stale_clear(c);
    c->set = *settings;
}

void ps_cache_close(ps_cache_t *c, void (*done)(void *ud), void *ud)
{
    if (!c)
        return;
    ps_cache_mem_clear(c);
    ps_cache_stale_clear(c);
    ps_cache_refresh_clear(c);
    ps_cache_flight_clear(c);
    c->on_closed = done;
    c->closed_ud = ud;
    ps_cache_ready_close(c);
}

void ps_cache_stats(const ps_cache_t *c, ps_cache_stats_t *out)
{
    *out = c->stats;
    out->memory_entries = HASH_COUNT(c->memory);
    out->flights = HASH_COUNT(c->flights);
    out->stale_entries = ps_cache_stale_count(c);
    out->refreshes_busy = ps_cache_refresh_busy(c);
}
