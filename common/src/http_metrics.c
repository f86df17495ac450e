#include "cm/http_metrics.h"

#include <string.h>

#include "cm/alloc.h"

/* Distinct (route, code) pairs kept; routes are a small fixed set and codes a handful each. */
#define MAX_SERIES 128

typedef struct series {
    const char *route; /* the router's label pointer: compared by address, then by text */
    int code;
    cm_metric_t *count;
    cm_metric_t *duration;
} series_t;

struct cm_http_metrics {
    cm_metrics_t *metrics;
    series_t series[MAX_SERIES];
    int n;
};

cm_http_metrics_t *cm_http_metrics_new(cm_metrics_t *metrics)
{
    cm_http_metrics_t *hm = cm_calloc(1, sizeof *hm);
    if (hm)
        hm->metrics = metrics;
    return hm;
}

void cm_http_metrics_free(cm_http_metrics_t *hm)
{
    cm_free(hm);
}

static series_t *find(cm_http_metrics_t *hm, const char *route, int code)
{
    for (int i = 0; i < hm->n; i++) {
        series_t *s = &hm->series[i];
        if (s->code == code && (s->route == route || strcmp(s->route, route) == 0))
            return s;
    }
    if (hm->n == MAX_SERIES)
        return NULL;
    char labels[256], code_text[8];
    snprintf(code_text, sizeof code_text, "%d", code);
    if (cm_metrics_labels(labels, sizeof labels, "route", route, "code", code_text, NULL) < 0)
        return NULL;
    cm_metric_t *count = cm_metrics_counter(hm->metrics, "http_requests_total",
                                            "HTTP responses by route and status code.", labels);
    if (cm_metrics_labels(labels, sizeof labels, "route", route, NULL) < 0)
        return NULL;
    cm_metric_t *duration =
        cm_metrics_histogram(hm->metrics, "http_request_duration_seconds",
                             "Time from a complete request head to its queued response.", labels,
                             cm_metrics_latency_bounds, cm_metrics_latency_nbounds);
    if (!count || !duration)
        return NULL;
    series_t *s = &hm->series[hm->n++];
    *s = (series_t){route, code, count, duration};
    return s;
}

void cm_http_metrics_observe(const cm_http_request_t *req, int status, double seconds, void *ud)
{
    cm_http_metrics_t *hm = ud;
    const char *route = req && req->route ? req->route : "unmatched";
    series_t *s = find(hm, route, status);
    if (!s)
        return;
    cm_counter_inc(s->count);
    cm_histogram_observe(s->duration, seconds);
}
