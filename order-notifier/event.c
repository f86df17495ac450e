#include "event.h"

#include "cm/alloc.h"
#include "cm/utf8.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <float.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

const char *const on_event_order_fields[] = {
    "id",       "user_id",         "market", "side",       "price",
    "quantity", "filled_quantity", "status", "updated_at", NULL,
};

#define CHANNEL_PREFIX "orders:user:"

/* A number as raw text that reads back to the same double. cJSON prints with 15 significant
 * digits whenever that reads back within DBL_EPSILON of the value, which is not the value
 * (905441800000000.125 printed as an integer); its sprintf+sscanf check is also the costliest
 * step of encoding an event. An integer prints exactly as digits; anything else as the
 * shortest of %.15g, %.16g and %.17g that strtod turns back into it (%.17g always does).
 * A number that is not finite (1e999) stays as cJSON's, which prints null. Takes `v`;
 * returns the item to use, or NULL (ENOMEM, `v` freed). */
static cJSON *number_as_raw(cJSON *v)
{
    if (!cJSON_IsNumber(v) || !isfinite(v->valuedouble))
        return v;
    double d = v->valuedouble;
    char text[32];
    if (d == floor(d) && fabs(d) <= 9007199254740992.0 && !(d == 0 && signbit(d))) /* -0 */
        snprintf(text, sizeof text, "%" PRId64, (int64_t)d);
    else {
        for (int digits = 15; digits <= 17; digits++) {
            snprintf(text, sizeof text, "%.*g", digits, d);
            if (strtod(text, NULL) == d)
                break;
        }
    }
    cJSON_Delete(v);
    return cJSON_CreateRaw(text);
}

/* Moves the allow-listed fields out of `src` (which the caller owns and deletes) into a new
 * object: strings, numbers and nulls only, so nested objects smuggled under an allowed name
 * cannot carry anything either. Moving, not copying: this runs for every event. */
static int valid_id(const cJSON *v, int64_t *out);

static cJSON *allow_list(cJSON *src, int64_t *order_id)
{
    const cJSON *oid = cJSON_GetObjectItemCaseSensitive(src, "id");
    if (order_id && (valid_id(oid, order_id) != 0))
        *order_id = 0;
    if (!cJSON_IsObject(src))
        return NULL;
    cJSON *dst = cJSON_CreateObject();
    if (!dst)
        return NULL;
    for (const char *const *f = on_event_order_fields; *f; f++) {
        cJSON *v = cJSON_GetObjectItemCaseSensitive(src, *f);
        if (!v || !(cJSON_IsString(v) || cJSON_IsNumber(v) || cJSON_IsNull(v)))
            continue;
        cJSON_DetachItemViaPointer(src, v);
        v = number_as_raw(v);
        if (!v || !cJSON_AddItemToObject(dst, *f, v)) {
            cJSON_Delete(v);
            cJSON_Delete(dst);
            return NULL;
        }
    }
    return dst;
}

static int valid_id(const cJSON *v, int64_t *out)
{
    double d;
    if (cJSON_IsNumber(v))
        d = v->valuedouble;
    else if (cJSON_IsString(v)) {
        char *end;
        d = strtod(v->valuestring, &end);
        if (end == v->valuestring || *end)
            return -1;
    } else
        return -1;
    if (!isfinite(d) || d < 1 || d > 9007199254740992.0 || d != floor(d))
        return -1;
    *out = (int64_t)d;
    return 0;
}

/* created_at, Unix seconds: anything but a finite positive number means unknown (0). */
static double valid_time(double d)
{
    return isfinite(d) && d > 0 ? d : 0;
}

static double parse_time(const char *s)
{
    if (!s)
        return 0;
    char *end;
    double d = strtod(s, &end);
    return end != s ? valid_time(d) : 0;
}

void on_event_clear(on_event_t *ev)
{
    cm_free(ev->user_id);
    cm_free(ev->event_type);
    cJSON_Delete(ev->order);
    memset(ev, 0, sizeof *ev);
}

int on_event_parse(const char *payload, size_t len, on_event_t *ev)
{
    memset(ev, 0, sizeof *ev);
    cJSON *j = cJSON_ParseWithLength(payload, len);
    if (!cJSON_IsObject(j)) {
        cJSON_Delete(j);
        return UV_EINVAL;
    }
    int rc = UV_EINVAL;
    if (valid_id(cJSON_GetObjectItemCaseSensitive(j, "id"), &ev->id) != 0)
        goto done;
    const cJSON *user = cJSON_GetObjectItemCaseSensitive(j, "user_id");
    const cJSON *type = cJSON_GetObjectItemCaseSensitive(j, "event_type");
    cJSON *order = cJSON_GetObjectItemCaseSensitive(j, "order");
    if (!user && !type && !order) {
        rc = UV_EAGAIN; /* id only: the trigger found the event too big for NOTIFY */
        goto done;
    }
    if (!cJSON_IsString(user) || !*user->valuestring || !cJSON_IsString(type) ||
        !cJSON_IsObject(order))
        goto done;
    const cJSON *at = cJSON_GetObjectItemCaseSensitive(j, "created_at");
    if (cJSON_IsString(at))
        ev->created_at = parse_time(at->valuestring);
    else if (cJSON_IsNumber(at))
        ev->created_at = valid_time(at->valuedouble); /* 1e999 reads as inf */
    ev->user_id = cm_strdup(user->valuestring);
    ev->event_type = cm_strdup(type->valuestring);
    ev->order = allow_list(order, &ev->order_id);
    if (!ev->user_id || !ev->event_type || !ev->order) {
        rc = UV_ENOMEM;
        goto done;
    }
    rc = 0;
done:
    cJSON_Delete(j);
    if (rc != 0 && rc != UV_EAGAIN)
        on_event_clear(ev);
    else if (rc == UV_EAGAIN) {
        int64_t id = ev->id;
        on_event_clear(ev);
        ev->id = id;
    }
    return rc;
}

int on_event_from_row(int64_t id, const char *user_id, const char *event_type,
                      const char *payload_json, const char *created_at, on_event_t *ev)
{
    memset(ev, 0, sizeof *ev);
    if (id < 1 || !user_id || !*user_id || !event_type || !payload_json)
        return UV_EINVAL;
    cJSON *j = cJSON_Parse(payload_json);
    if (!cJSON_IsObject(j)) {
        cJSON_Delete(j);
        return UV_EINVAL;
    }
    ev->id = id;
    ev->created_at = parse_time(created_at);
    ev->user_id = cm_strdup(user_id);
    ev->event_type = cm_strdup(event_type);
    ev->order = allow_list(j, &ev->order_id);
    cJSON_Delete(j);
    if (!ev->user_id || !ev->event_type || !ev->order) {
        on_event_clear(ev);
        return UV_ENOMEM;
    }
    return 0;
}

/* Prints `j` at the end of `out` and deletes it. An event's frame is a few hundred bytes:
 * printed in place, without cJSON's own growing buffer, when it fits. */
static int print_into(cJSON *j, cm_buf_t *out)
{
    int rc = cm_buf_reserve(out, 1024);
    if (rc != 0) {
        cJSON_Delete(j);
        return rc;
    }
    if (cJSON_PrintPreallocated(j, out->data + out->len, 1024, 0)) {
        out->len += strlen(out->data + out->len);
        cJSON_Delete(j);
        return 0;
    }
    char *s = cJSON_PrintUnformatted(j);
    cJSON_Delete(j);
    if (!s)
        return UV_ENOMEM;
    rc = cm_buf_puts(out, s);
    cJSON_free(s);
    return rc;
}

/* Adds the event's order by reference: ev->order is allow-listed by construction (only this
 * file makes one), and a reference is not freed with `obj`. Not cJSON_AddItemReferenceToObject:
 * it leaks the reference when copying the key fails (found by allocation_failures). */
static int add_order(cJSON *obj, const on_event_t *ev)
{
    cJSON *ref = ev->order ? cJSON_CreateObjectReference(ev->order->child) : NULL;
    if (!ref)
        return UV_ENOMEM;
    if (!cJSON_AddItemToObject(obj, "order", ref)) {
        cJSON_Delete(ref);
        return UV_ENOMEM;
    }
    return 0;
}

/* Adds an event id as JSON number text of its own: cJSON prints numbers with 15 significant
 * digits when that reads back within DBL_EPSILON, which for ids past 10^15 is another id
 * (9007199254740992 came back as 9007199254740990). */
static int add_id(cJSON *obj, const char *name, int64_t id)
{
    char text[24];
    snprintf(text, sizeof text, "%" PRId64, id);
    return cJSON_AddRawToObject(obj, name, text) ? 0 : UV_ENOMEM;
}

int on_event_message(const on_event_t *ev, cm_buf_t *out)
{
    /* "%.6f" of any double fits: up to 309 integer digits, the point and 6 decimals. */
    char at[DBL_MAX_10_EXP + 16];
    snprintf(at, sizeof at, "%.6f", ev->created_at);
    cJSON *j = cJSON_CreateObject();
    if (!j || add_id(j, "id", ev->id) != 0 || !cJSON_AddStringToObject(j, "user_id", ev->user_id) ||
        !cJSON_AddStringToObject(j, "event_type", ev->event_type) ||
        !cJSON_AddStringToObject(j, "created_at", at) || add_order(j, ev) != 0) {
        cJSON_Delete(j);
        return UV_ENOMEM;
    }
    return print_into(j, out);
}

int on_event_frame(const on_event_t *ev, cm_buf_t *out)
{
    cJSON *j = cJSON_CreateObject();
    if (!j || !cJSON_AddStringToObject(j, "type", "order_update") ||
        add_id(j, "event_id", ev->id) != 0 ||
        !cJSON_AddStringToObject(j, "event_type", ev->event_type) || add_order(j, ev) != 0) {
        cJSON_Delete(j);
        return UV_ENOMEM;
    }
    return print_into(j, out);
}

#define ENVELOPE_TAG "e1 "

int on_event_envelope(const on_event_t *ev, cm_buf_t *out)
{
    if (cm_buf_printf(out, ENVELOPE_TAG "%" PRId64 " %.6f %" PRId64 "\n", ev->id, ev->created_at,
                      ev->order_id) != 0)
        return UV_ENOMEM;
    return on_event_frame(ev, out);
}

int on_event_envelope_parse(const char *msg, size_t len, int64_t *id, double *created_at,
                            int64_t *order_id, const char **frame, size_t *frame_len)
{
    const size_t tag = sizeof ENVELOPE_TAG - 1;
    const char *nl = len > tag ? memchr(msg, '\n', len < 64 ? len : 64) : NULL;
    if (!nl || memcmp(msg, ENVELOPE_TAG, tag) != 0)
        return UV_EINVAL;
    /* The header is ours, digits and one space: strto* on a NUL-terminated copy. */
    char head[64];
    size_t hl = (size_t)(nl - msg) - tag;
    memcpy(head, msg + tag, hl);
    head[hl] = '\0';
    char *end = NULL;
    errno = 0;
    long long v = strtoll(head, &end, 10);
    if (errno || end == head || *end != ' ' || v < 1)
        return UV_EINVAL;
    char *end2 = NULL;
    double at = strtod(end + 1, &end2);
    if (end2 == end + 1 || (*end2 && *end2 != ' ') || !isfinite(at) || at < 0)
        return UV_EINVAL;
    long long oid = 0;
    if (*end2 == ' ') {
        char *end3 = NULL;
        errno = 0;
        oid = strtoll(end2 + 1, &end3, 10);
        if (errno || end3 == end2 + 1 || *end3 || oid < 0)
            return UV_EINVAL;
    }
    const char *f = nl + 1;
    size_t flen = len - (size_t)(f - msg);
    if (flen == 0 || f[0] != '{' || !cm_utf8_valid(f, flen))
        return UV_EINVAL;
    *id = v;
    *created_at = at;
    *order_id = oid;
    *frame = f;
    *frame_len = flen;
    return 0;
}

int on_event_channel(const char *user_id, cm_buf_t *out)
{
    if (cm_buf_puts(out, CHANNEL_PREFIX) != 0 || cm_buf_puts(out, user_id) != 0)
        return UV_ENOMEM;
    return 0;
}
