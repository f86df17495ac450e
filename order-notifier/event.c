#include "event.h"

#include "cm/alloc.h"

#include <cjson/cJSON.h>
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

/* Copies the allow-listed fields of `src`: strings, numbers and nulls only, so nested objects
 * smuggled under an allowed name cannot carry anything either. */
static cJSON *allow_list(const cJSON *src)
{
    if (!cJSON_IsObject(src))
        return NULL;
    cJSON *dst = cJSON_CreateObject();
    if (!dst)
        return NULL;
    for (const char *const *f = on_event_order_fields; *f; f++) {
        const cJSON *v = cJSON_GetObjectItemCaseSensitive(src, *f);
        if (!v || !(cJSON_IsString(v) || cJSON_IsNumber(v) || cJSON_IsNull(v)))
            continue;
        cJSON *copy = cJSON_Duplicate(v, 0);
        if (!copy || !cJSON_AddItemToObject(dst, *f, copy)) {
            cJSON_Delete(copy);
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

static double parse_time(const char *s)
{
    if (!s)
        return 0;
    char *end;
    double d = strtod(s, &end);
    return (end != s && isfinite(d) && d > 0) ? d : 0;
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
    const cJSON *order = cJSON_GetObjectItemCaseSensitive(j, "order");
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
        ev->created_at = at->valuedouble;
    ev->user_id = cm_strdup(user->valuestring);
    ev->event_type = cm_strdup(type->valuestring);
    ev->order = allow_list(order);
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
    ev->order = allow_list(j);
    cJSON_Delete(j);
    if (!ev->user_id || !ev->event_type || !ev->order) {
        on_event_clear(ev);
        return UV_ENOMEM;
    }
    return 0;
}

/* Prints `j` into `out` and deletes it. */
static int print_into(cJSON *j, cm_buf_t *out)
{
    char *s = cJSON_PrintUnformatted(j);
    cJSON_Delete(j);
    if (!s)
        return UV_ENOMEM;
    int rc = cm_buf_puts(out, s);
    cJSON_free(s);
    return rc;
}

/* Adds a borrowed copy of the allow-listed order (re-filtered: the struct may come from any
 * caller). */
static int add_order(cJSON *obj, const on_event_t *ev)
{
    cJSON *order = allow_list(ev->order);
    if (!order)
        return UV_ENOMEM;
    if (!cJSON_AddItemToObject(obj, "order", order)) {
        cJSON_Delete(order);
        return UV_ENOMEM;
    }
    return 0;
}

int on_event_message(const on_event_t *ev, cm_buf_t *out)
{
    char at[32];
    snprintf(at, sizeof at, "%.6f", ev->created_at);
    cJSON *j = cJSON_CreateObject();
    if (!j || !cJSON_AddNumberToObject(j, "id", (double)ev->id) ||
        !cJSON_AddStringToObject(j, "user_id", ev->user_id) ||
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
        !cJSON_AddNumberToObject(j, "event_id", (double)ev->id) ||
        !cJSON_AddStringToObject(j, "event_type", ev->event_type) || add_order(j, ev) != 0) {
        cJSON_Delete(j);
        return UV_ENOMEM;
    }
    return print_into(j, out);
}

int on_event_channel(const char *user_id, cm_buf_t *out)
{
    if (cm_buf_puts(out, CHANNEL_PREFIX) != 0 || cm_buf_puts(out, user_id) != 0)
        return UV_ENOMEM;
    return 0;
}
