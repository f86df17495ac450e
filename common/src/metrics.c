/*
 * metrics.c: Prometheus registry and text exposition format 0.0.4.
 *
 * A registry is a list of families (one name, help, type, and for histograms the bounds); a
 * family is a list of series (one label set each). Registration is the slow path: it
 * validates, canonicalises the labels (sorted by name) and scans the lists, so that a series
 * can exist only once. Updates are a plain add on the series' fields.
 */
#include "cm/metrics.h"

#include "cm/alloc.h"

#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

/* ------------------------------------------------------------------------------------------ */
/* Types                                                                                       */
/* ------------------------------------------------------------------------------------------ */

typedef enum { TYPE_COUNTER, TYPE_GAUGE, TYPE_HISTOGRAM } family_type_t;
typedef enum { KIND_COUNTER, KIND_GAUGE, KIND_GAUGE_FN, KIND_HISTOGRAM } series_kind_t;

typedef struct family family_t;

struct cm_metric {
    /* Hot fields first. Counter/gauge: the value. Histogram: the sum of observations. */
    double value;
    uint64_t count;    /* histogram: number of observations */
    uint64_t *buckets; /* histogram: nbounds + 1 non-cumulative counts, the last is +Inf */
    const double *bounds;
    size_t nbounds;
    series_kind_t kind;
    double (*fn)(void *ud);
    void *ud;
    char *labels; /* canonical `a="1",b="2"`, "" when none */
    family_t *family;
    cm_metric_t *next;
};

struct family {
    char *name;
    char *help;
    family_type_t type;
    double *bounds; /* histogram only */
    size_t nbounds;
    char (*le)[32]; /* histogram: the nbounds + 1 `le` values as rendered, formatted once */
    cm_metric_t *series;
    cm_metric_t *last;
    family_t *next;
};

struct cm_metrics {
    family_t *families;
    family_t *last;
};

const double cm_metrics_latency_bounds[] = {
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
    0.05,    0.1,    0.25,    0.5,    1,     2.5,    5,     10,
};
const size_t cm_metrics_latency_nbounds =
    sizeof cm_metrics_latency_bounds / sizeof cm_metrics_latency_bounds[0];

/* ------------------------------------------------------------------------------------------ */
/* Validation and label canonicalisation                                                      */
/* ------------------------------------------------------------------------------------------ */

static int is_alpha(char ch)
{
    return (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || ch == '_';
}

static int is_digit(char ch)
{
    return ch >= '0' && ch <= '9';
}

/* [a-zA-Z_:][a-zA-Z0-9_:]* */
static int metric_name_valid(const char *s)
{
    if (!s || !*s || !(is_alpha(*s) || *s == ':'))
        return 0;
    for (s++; *s; s++) {
        if (!(is_alpha(*s) || is_digit(*s) || *s == ':'))
            return 0;
    }
    return 1;
}

/* Exposition text must be UTF-8; a stray byte would make the whole scrape fail. */
static int utf8_valid(const char *s, size_t len)
{
    const unsigned char *p = (const unsigned char *)s;
    size_t i = 0;
    while (i < len) {
        unsigned char c = p[i];
        size_t n;
        uint32_t cp;
        if (c < 0x80) {
            i++;
            continue;
        } else if (c >= 0xc2 && c <= 0xdf) {
            n = 1;
            cp = c & 0x1f;
        } else if (c >= 0xe0 && c <= 0xef) {
            n = 2;
            cp = c & 0x0f;
        } else if (c >= 0xf0 && c <= 0xf4) {
            n = 3;
            cp = c & 0x07;
        } else {
            return 0;
        }
        if (i + n >= len)
            return 0; /* truncated sequence */
        for (size_t k = 1; k <= n; k++) {
            if ((p[i + k] & 0xc0) != 0x80)
                return 0;
            cp = (cp << 6) | (p[i + k] & 0x3f);
        }
        if ((n == 2 && cp < 0x800) || (n == 3 && cp < 0x10000) || cp > 0x10ffff ||
            (cp >= 0xd800 && cp <= 0xdfff))
            return 0;
        i += n + 1;
    }
    return 1;
}

typedef struct pair {
    const char *name;
    size_t nlen;
    const char *value; /* escaped, as written, without quotes */
    size_t vlen;
} pair_t;

static int pair_cmp(const void *a, const void *b)
{
    const pair_t *x = a, *y = b;
    size_t n = x->nlen < y->nlen ? x->nlen : y->nlen;
    int c = memcmp(x->name, y->name, n);
    if (c)
        return c;
    return (x->nlen > y->nlen) - (x->nlen < y->nlen);
}

/*
 * Parses `k="v",...` and returns a new canonical string (sorted by name) in *out (caller
 * frees), "" for NULL/"". Returns 0, UV_EINVAL (malformed, duplicate or reserved name, "le" on
 * a histogram) or UV_ENOMEM.
 */
static int canonical_labels(const char *labels, int histogram, char **out)
{
    *out = NULL;
    if (!labels || !*labels) {
        *out = cm_strdup("");
        return *out ? 0 : UV_ENOMEM;
    }
    size_t len = strlen(labels);
    if (!utf8_valid(labels, len))
        return UV_EINVAL;
    size_t max = 1;
    for (size_t i = 0; i < len; i++)
        max += labels[i] == '=';
    pair_t *pairs = cm_malloc(max * sizeof *pairs);
    if (!pairs)
        return UV_ENOMEM;
    size_t np = 0;
    const char *p = labels;
    const char *end = labels + len;
    int rc = UV_EINVAL;
    while (p < end) {
        pair_t *pr = &pairs[np];
        pr->name = p;
        if (np == max || !is_alpha(*p))
            goto done;
        while (p < end && (is_alpha(*p) || is_digit(*p)))
            p++;
        pr->nlen = (size_t)(p - pr->name);
        if (pr->nlen >= 2 && pr->name[0] == '_' && pr->name[1] == '_')
            goto done;
        if (histogram && pr->nlen == 2 && memcmp(pr->name, "le", 2) == 0)
            goto done;
        if (end - p < 2 || p[0] != '=' || p[1] != '"')
            goto done;
        p += 2;
        pr->value = p;
        while (p < end && *p != '"') {
            if (*p == '\n')
                goto done;
            if (*p == '\\') {
                if (p + 1 >= end || (p[1] != '\\' && p[1] != '"' && p[1] != 'n'))
                    goto done;
                p++;
            }
            p++;
        }
        if (p == end)
            goto done;
        pr->vlen = (size_t)(p - pr->value);
        p++; /* closing quote */
        np++;
        if (p < end) {
            if (*p != ',' || p + 1 == end)
                goto done;
            p++;
        }
    }
    qsort(pairs, np, sizeof *pairs, pair_cmp);
    for (size_t i = 1; i < np; i++) {
        if (pair_cmp(&pairs[i - 1], &pairs[i]) == 0)
            goto done;
    }
    /* The canonical form is at most as long as the input (same pairs, same separators). */
    char *s = cm_malloc(len + 1);
    if (!s) {
        rc = UV_ENOMEM;
        goto done;
    }
    size_t n = 0;
    for (size_t i = 0; i < np; i++) {
        if (i)
            s[n++] = ',';
        memcpy(s + n, pairs[i].name, pairs[i].nlen);
        n += pairs[i].nlen;
        s[n++] = '=';
        s[n++] = '"';
        memcpy(s + n, pairs[i].value, pairs[i].vlen);
        n += pairs[i].vlen;
        s[n++] = '"';
    }
    s[n] = '\0';
    *out = s;
    rc = 0;
done:
    cm_free(pairs);
    return rc;
}

/* ------------------------------------------------------------------------------------------ */
/* Registry                                                                                    */
/* ------------------------------------------------------------------------------------------ */

cm_metrics_t *cm_metrics_new(void)
{
    return cm_calloc(1, sizeof(cm_metrics_t));
}

static void series_free(cm_metric_t *s)
{
    cm_free(s->labels);
    cm_free(s->buckets);
    cm_free(s);
}

static void family_free(family_t *f)
{
    cm_metric_t *s = f->series;
    while (s) {
        cm_metric_t *next = s->next;
        series_free(s);
        s = next;
    }
    cm_free(f->name);
    cm_free(f->help);
    cm_free(f->bounds);
    cm_free(f->le);
    cm_free(f);
}

void cm_metrics_free(cm_metrics_t *m)
{
    if (!m)
        return;
    family_t *f = m->families;
    while (f) {
        family_t *next = f->next;
        family_free(f);
        f = next;
    }
    cm_free(m);
}

static family_t *family_find(const cm_metrics_t *m, const char *name)
{
    for (family_t *f = m->families; f; f = f->next) {
        if (strcmp(f->name, name) == 0)
            return f;
    }
    return NULL;
}

static int has_suffix(const char *s, size_t slen, const char *suffix)
{
    size_t n = strlen(suffix);
    return slen > n && memcmp(s + slen - n, suffix, n) == 0;
}

/* A histogram `h` emits h_bucket, h_sum and h_count: no other family may use those names,
 * or a scrape would carry one series twice. */
static int name_collides(const cm_metrics_t *m, const char *name, family_type_t type)
{
    static const char *const suffixes[] = {"_bucket", "_sum", "_count"};
    size_t len = strlen(name);
    char tmp[256];
    for (size_t i = 0; i < 3; i++) {
        if (type == TYPE_HISTOGRAM) {
            if (len + strlen(suffixes[i]) >= sizeof tmp)
                return 1;
            snprintf(tmp, sizeof tmp, "%s%s", name, suffixes[i]);
            if (family_find(m, tmp))
                return 1;
        }
        if (has_suffix(name, len, suffixes[i])) {
            size_t base = len - strlen(suffixes[i]);
            if (base >= sizeof tmp)
                continue;
            memcpy(tmp, name, base);
            tmp[base] = '\0';
            family_t *f = family_find(m, tmp);
            if (f && f->type == TYPE_HISTOGRAM)
                return 1;
        }
    }
    return 0;
}

static int bounds_valid(const double *bounds, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        if (!isfinite(bounds[i]) || (i && !(bounds[i] > bounds[i - 1])))
            return 0;
    }
    return 1;
}

/* Decimal digits of v into buf (at least 21 bytes); returns the length. snprintf costs more
 * than the rest of a sample line, and bucket counts are most of the lines. */
static size_t format_u64(char *buf, uint64_t v)
{
    char tmp[20];
    size_t n = 0;
    do {
        tmp[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    for (size_t i = 0; i < n; i++)
        buf[i] = tmp[n - 1 - i];
    buf[n] = '\0';
    return n;
}

/* Formats v as Prometheus clients do: +Inf/-Inf/NaN, exact integers in plain digits, other
 * values in the shortest %g form that parses back to the same double. bufsz >= 32. */
static void format_double(char *buf, size_t bufsz, double v)
{
    if (isnan(v)) {
        snprintf(buf, bufsz, "NaN");
    } else if (isinf(v)) {
        snprintf(buf, bufsz, v > 0 ? "+Inf" : "-Inf");
    } else if (v == trunc(v) && fabs(v) <= 9007199254740992.0) {
        if (v < 0) { /* -0.0 is not < 0, so it renders as "0" */
            buf[0] = '-';
            format_u64(buf + 1, (uint64_t)-v);
        } else {
            format_u64(buf, (uint64_t)v);
        }
    } else {
        for (int prec = 1; prec <= 17; prec++) {
            snprintf(buf, bufsz, "%.*g", prec, v);
            if (strtod(buf, NULL) == v)
                break;
        }
    }
}

/* The common registration path for every kind. */
static cm_metric_t *series_get(cm_metrics_t *m, const char *name, const char *help,
                               const char *labels, series_kind_t kind, double (*fn)(void *),
                               void *ud, const double *bounds, size_t nbounds)
{
    family_type_t type = kind == KIND_COUNTER     ? TYPE_COUNTER
                         : kind == KIND_HISTOGRAM ? TYPE_HISTOGRAM
                                                  : TYPE_GAUGE;
    if (!m || !metric_name_valid(name) || !help || !utf8_valid(help, strlen(help)))
        return NULL;
    if (type == TYPE_HISTOGRAM && (nbounds && (!bounds || !bounds_valid(bounds, nbounds))))
        return NULL;
    family_t *f = family_find(m, name);
    if (f) {
        if (f->type != type || strcmp(f->help, help) != 0)
            return NULL;
        if (type == TYPE_HISTOGRAM &&
            (f->nbounds != nbounds ||
             (nbounds && memcmp(f->bounds, bounds, nbounds * sizeof *bounds) != 0)))
            return NULL;
    } else if (name_collides(m, name, type)) {
        return NULL;
    }

    char *canon;
    if (canonical_labels(labels, type == TYPE_HISTOGRAM, &canon) != 0)
        return NULL;
    if (f) {
        for (cm_metric_t *s = f->series; s; s = s->next) {
            if (strcmp(s->labels, canon) != 0)
                continue;
            cm_free(canon);
            if (s->kind != kind || (kind == KIND_GAUGE_FN && (s->fn != fn || s->ud != ud)))
                return NULL;
            return s;
        }
    }

    /* A new series, and perhaps a new family: allocate everything before linking anything. */
    family_t *nf = NULL;
    cm_metric_t *s = cm_calloc(1, sizeof *s);
    if (!s)
        goto fail;
    s->labels = canon;
    canon = NULL;
    s->kind = kind;
    s->fn = fn;
    s->ud = ud;
    if (!f) {
        nf = cm_calloc(1, sizeof *nf);
        if (!nf)
            goto fail;
        nf->type = type;
        nf->name = cm_strdup(name);
        nf->help = cm_strdup(help);
        if (!nf->name || !nf->help)
            goto fail;
        if (type == TYPE_HISTOGRAM) {
            if (nbounds) {
                nf->bounds = cm_malloc(nbounds * sizeof *bounds);
                if (!nf->bounds)
                    goto fail;
                memcpy(nf->bounds, bounds, nbounds * sizeof *bounds);
            }
            nf->le = cm_malloc((nbounds + 1) * sizeof *nf->le);
            if (!nf->le)
                goto fail;
            for (size_t i = 0; i < nbounds; i++)
                format_double(nf->le[i], sizeof nf->le[i], bounds[i]);
            snprintf(nf->le[nbounds], sizeof nf->le[nbounds], "+Inf");
        }
        nf->nbounds = nbounds;
    }
    family_t *fam = f ? f : nf;
    if (type == TYPE_HISTOGRAM) {
        s->buckets = cm_calloc(fam->nbounds + 1, sizeof *s->buckets);
        if (!s->buckets)
            goto fail;
        s->bounds = fam->bounds;
        s->nbounds = fam->nbounds;
    }
    s->family = fam;
    if (fam->last)
        fam->last->next = s;
    else
        fam->series = s;
    fam->last = s;
    if (nf) {
        if (m->last)
            m->last->next = nf;
        else
            m->families = nf;
        m->last = nf;
    }
    return s;

fail:
    cm_free(canon);
    if (s)
        series_free(s);
    if (nf)
        family_free(nf);
    return NULL;
}

cm_metric_t *cm_metrics_counter(cm_metrics_t *m, const char *name, const char *help,
                                const char *labels)
{
    return series_get(m, name, help, labels, KIND_COUNTER, NULL, NULL, NULL, 0);
}

cm_metric_t *cm_metrics_gauge(cm_metrics_t *m, const char *name, const char *help,
                              const char *labels)
{
    return series_get(m, name, help, labels, KIND_GAUGE, NULL, NULL, NULL, 0);
}

cm_metric_t *cm_metrics_gauge_fn(cm_metrics_t *m, const char *name, const char *help,
                                 const char *labels, double (*fn)(void *ud), void *ud)
{
    if (!fn)
        return NULL;
    return series_get(m, name, help, labels, KIND_GAUGE_FN, fn, ud, NULL, 0);
}

cm_metric_t *cm_metrics_histogram(cm_metrics_t *m, const char *name, const char *help,
                                  const char *labels, const double *bounds, size_t nbounds)
{
    return series_get(m, name, help, labels, KIND_HISTOGRAM, NULL, NULL, bounds, nbounds);
}

/* ------------------------------------------------------------------------------------------ */
/* Updates (hot path)                                                                          */
/* ------------------------------------------------------------------------------------------ */

void cm_counter_inc(cm_metric_t *c)
{
    c->value += 1;
}

void cm_counter_add(cm_metric_t *c, double v)
{
    if (v >= 0) /* false for NaN too */
        c->value += v;
}

void cm_gauge_set(cm_metric_t *g, double v)
{
    g->value = v;
}

void cm_gauge_add(cm_metric_t *g, double v)
{
    g->value += v;
}

void cm_histogram_observe(cm_metric_t *h, double v)
{
    /* First bound >= v; `le` is inclusive. NaN compares false everywhere and lands in +Inf. */
    size_t lo = 0, hi = h->nbounds;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (h->bounds[mid] >= v)
            hi = mid;
        else
            lo = mid + 1;
    }
    h->buckets[lo]++;
    h->count++;
    h->value += v;
}

double cm_metric_value(const cm_metric_t *c)
{
    switch (c->kind) {
    case KIND_GAUGE_FN:
        return c->fn(c->ud);
    case KIND_HISTOGRAM:
        return (double)c->count;
    default:
        return c->value;
    }
}

/* ------------------------------------------------------------------------------------------ */
/* Label building                                                                              */
/* ------------------------------------------------------------------------------------------ */

int cm_metrics_labels(char *out, size_t outsz, const char *k1, const char *v1, ...)
{
    if (outsz == 0)
        return UV_E2BIG;
    size_t n = 0;
    va_list ap;
    va_start(ap, v1);
    const char *k = k1;
    const char *v = v1;
    int first = 1;
    while (k) {
        if (!v)
            v = "";
        size_t klen = strlen(k);
        /* name, '=', '"', value (escaped: up to 2 bytes each), '"', maybe ',' */
        if (n + !first + klen + 2 >= outsz)
            goto too_big;
        if (!first)
            out[n++] = ',';
        memcpy(out + n, k, klen);
        n += klen;
        out[n++] = '=';
        out[n++] = '"';
        for (const char *p = v; *p; p++) {
            const char *esc = NULL;
            if (*p == '\\')
                esc = "\\\\";
            else if (*p == '"')
                esc = "\\\"";
            else if (*p == '\n')
                esc = "\\n";
            size_t need = esc ? 2 : 1;
            if (n + need >= outsz)
                goto too_big;
            if (esc) {
                out[n++] = esc[0];
                out[n++] = esc[1];
            } else {
                out[n++] = *p;
            }
        }
        if (n + 1 >= outsz)
            goto too_big;
        out[n++] = '"';
        first = 0;
        k = va_arg(ap, const char *);
        if (k)
            v = va_arg(ap, const char *);
    }
    va_end(ap);
    out[n] = '\0';
    return n > INT_MAX ? UV_E2BIG : (int)n;

too_big:
    va_end(ap);
    out[0] = '\0';
    return UV_E2BIG;
}

/* ------------------------------------------------------------------------------------------ */
/* Rendering                                                                                   */
/* ------------------------------------------------------------------------------------------ */

/* HELP text escapes backslash and newline (not quotes). */
static int put_help(cm_buf_t *out, const char *s)
{
    const char *run = s;
    for (; *s; s++) {
        if (*s != '\\' && *s != '\n')
            continue;
        if (cm_buf_append(out, run, (size_t)(s - run)) != 0 ||
            cm_buf_puts(out, *s == '\\' ? "\\\\" : "\\n") != 0)
            return UV_ENOMEM;
        run = s + 1;
    }
    return cm_buf_puts(out, run);
}

static const char *type_name(family_type_t t)
{
    return t == TYPE_COUNTER ? "counter" : t == TYPE_GAUGE ? "gauge" : "histogram";
}

/* `name[suffix]{labels[,le="x"]} value\n`, appended piecewise (the buffer grows once per
 * sample at most). */
static int put_sample(cm_buf_t *out, const char *name, const char *suffix, const char *labels,
                      const char *le, const char *value)
{
    size_t nlen = strlen(name), slen = strlen(suffix), llen = strlen(labels);
    size_t elen = le ? strlen(le) : 0, vlen = strlen(value);
    /* name suffix { labels , le=" le " } space value \n */
    if (cm_buf_reserve(out, nlen + slen + llen + elen + vlen + 12) != 0)
        return UV_ENOMEM;
    char *p = out->data + out->len;
    memcpy(p, name, nlen);
    p += nlen;
    memcpy(p, suffix, slen);
    p += slen;
    if (llen || le) {
        *p++ = '{';
        memcpy(p, labels, llen);
        p += llen;
        if (le) {
            if (llen)
                *p++ = ',';
            memcpy(p, "le=\"", 4);
            p += 4;
            memcpy(p, le, elen);
            p += elen;
            *p++ = '"';
        }
        *p++ = '}';
    }
    *p++ = ' ';
    memcpy(p, value, vlen);
    p += vlen;
    *p++ = '\n';
    *p = '\0';
    out->len = (size_t)(p - out->data);
    return 0;
}

static int render_histogram(cm_buf_t *out, const family_t *f, const cm_metric_t *s)
{
    char val[32];
    uint64_t cum = 0;
    for (size_t i = 0; i <= f->nbounds; i++) {
        cum += s->buckets[i];
        format_u64(val, cum);
        if (put_sample(out, f->name, "_bucket", s->labels, f->le[i], val) != 0)
            return UV_ENOMEM;
    }
    format_double(val, sizeof val, s->value);
    if (put_sample(out, f->name, "_sum", s->labels, NULL, val) != 0)
        return UV_ENOMEM;
    format_u64(val, s->count);
    return put_sample(out, f->name, "_count", s->labels, NULL, val);
}

int cm_metrics_render(const cm_metrics_t *m, cm_buf_t *out)
{
    for (const family_t *f = m->families; f; f = f->next) {
        if (cm_buf_printf(out, "# HELP %s ", f->name) != 0 || put_help(out, f->help) != 0 ||
            cm_buf_printf(out, "\n# TYPE %s %s\n", f->name, type_name(f->type)) != 0)
            return UV_ENOMEM;
        for (const cm_metric_t *s = f->series; s; s = s->next) {
            if (s->kind == KIND_HISTOGRAM) {
                if (render_histogram(out, f, s) != 0)
                    return UV_ENOMEM;
                continue;
            }
            char val[32];
            format_double(val, sizeof val, cm_metric_value(s));
            if (put_sample(out, f->name, "", s->labels, NULL, val) != 0)
                return UV_ENOMEM;
        }
    }
    return 0;
}
