/*
 * fuzz_event: order-notifier/event.c, the decoding of order events.
 *   - on_event_parse on the input as a NOTIFY payload or Redis message;
 *   - on_event_from_row on the input cut at NUL bytes into the columns user_id, event_type,
 *     payload (jsonb as text) and created_at, with an id from the input's hash.
 * Checked: the documented results only; a decoded event holds what the contract says (id in
 * 1..2^53, a user and a type, an order with allow-listed scalar fields only, created_at finite
 * and not negative); on_event_message of it parses back (on_event_parse) to the same event;
 * on_event_frame is the client frame with the same order; nothing leaks.
 */
#include "fuzz.h"

#include "cm/alloc.h"
#include "cm/buf.h"
#include "cm/json.h"
#include "event.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

static int allowed(const char *name)
{
    for (const char *const *f = on_event_order_fields; *f; f++) {
        if (strcmp(*f, name) == 0)
            return 1;
    }
    return 0;
}

/* event.c keeps every finite number as raw text that reads back to the same double. */
static int is_number_raw(const cJSON *v)
{
    if (!cJSON_IsRaw(v))
        return 0;
    const char *p = v->valuestring;
    char *end;
    double d = strtod(p, &end);
    return (*p == '-' || (*p >= '0' && *p <= '9')) && end != p && !*end && isfinite(d);
}

static double number_of(const cJSON *v)
{
    return cJSON_IsRaw(v) ? strtod(v->valuestring, NULL) : v->valuedouble;
}

static void check_order(const cJSON *order)
{
    FUZZ_CHECK(cJSON_IsObject(order));
    const cJSON *it;
    cJSON_ArrayForEach(it, order)
    {
        FUZZ_CHECK(it->string && allowed(it->string));
        FUZZ_CHECK(cJSON_IsString(it) || cJSON_IsNumber(it) || cJSON_IsNull(it) ||
                   is_number_raw(it));
        /* each allowed name once */
        FUZZ_CHECK(cJSON_GetObjectItemCaseSensitive(order, it->string) == it);
    }
}

/* cJSON prints a number that is not finite as null: that is how it travels. */
static int same_value(const cJSON *a, const cJSON *b)
{
    if (cJSON_IsNumber(a) && !isfinite(a->valuedouble))
        return cJSON_IsNull(b);
    if (is_number_raw(a) || is_number_raw(b))
        return (cJSON_IsNumber(a) || is_number_raw(a)) && (cJSON_IsNumber(b) || is_number_raw(b)) &&
               number_of(a) == number_of(b) && !signbit(number_of(a)) == !signbit(number_of(b));
    return cJSON_Compare(a, b, 1);
}

static void check_event(const on_event_t *ev)
{
    FUZZ_CHECK(ev->id >= 1 && ev->id <= 9007199254740992LL);
    FUZZ_CHECK(ev->user_id && ev->user_id[0] && ev->event_type);
    FUZZ_CHECK(isfinite(ev->created_at) && ev->created_at >= 0);
    check_order(ev->order);
}

static void round_trip(const on_event_t *ev)
{
    cm_buf_t b = CM_BUF_INIT;
    FUZZ_CHECK(on_event_message(ev, &b) == 0);
    on_event_t back;
    int rc = on_event_parse(b.data, b.len, &back);
    FUZZ_CHECK(rc == 0);
    FUZZ_CHECK(back.id == ev->id);
    FUZZ_CHECK(strcmp(back.user_id, ev->user_id) == 0);
    FUZZ_CHECK(strcmp(back.event_type, ev->event_type) == 0);
    /* created_at travels as "%.6f": the same to the microsecond. */
    FUZZ_CHECK(fabs(back.created_at - ev->created_at) <= 1e-6 * fmax(1, fabs(ev->created_at)));
    const cJSON *it;
    cJSON_ArrayForEach(it, ev->order)
    {
        FUZZ_CHECK(same_value(it, cJSON_GetObjectItemCaseSensitive(back.order, it->string)));
    }
    FUZZ_CHECK(cJSON_GetArraySize(back.order) == cJSON_GetArraySize(ev->order));
    on_event_clear(&back);
    FUZZ_CHECK(back.user_id == NULL && back.order == NULL);
    cm_buf_free(&b);

    /* The client frame. */
    FUZZ_CHECK(on_event_frame(ev, &b) == 0);
    cJSON *f = cJSON_ParseWithLength(b.data, b.len);
    FUZZ_CHECK(cJSON_IsObject(f));
    const cJSON *type = cJSON_GetObjectItemCaseSensitive(f, "type");
    FUZZ_CHECK(cJSON_IsString(type) && strcmp(type->valuestring, "order_update") == 0);
    const cJSON *eid = cJSON_GetObjectItemCaseSensitive(f, "event_id");
    FUZZ_CHECK(cJSON_IsNumber(eid) && (int64_t)eid->valuedouble == ev->id);
    const cJSON *et = cJSON_GetObjectItemCaseSensitive(f, "event_type");
    FUZZ_CHECK(cJSON_IsString(et) && strcmp(et->valuestring, ev->event_type) == 0);
    check_order(cJSON_GetObjectItemCaseSensitive(f, "order"));
    cJSON_Delete(f);
    cm_buf_free(&b);

    FUZZ_CHECK(on_event_channel(ev->user_id, &b) == 0);
    FUZZ_CHECK(strncmp(b.data, "orders:user:", 12) == 0 && strcmp(b.data + 12, ev->user_id) == 0);
    cm_buf_free(&b);
}

static void parse(const uint8_t *data, size_t size)
{
    on_event_t ev;
    memset(&ev, 0x5a, sizeof ev);
    int rc = on_event_parse((const char *)data, size, &ev);
    FUZZ_CHECK(rc == 0 || rc == UV_EAGAIN || rc == UV_EINVAL || rc == UV_ENOMEM);
    if (rc == UV_EAGAIN) {
        FUZZ_CHECK(ev.id >= 1 && !ev.user_id && !ev.event_type && !ev.order);
        return;
    }
    if (rc != 0) {
        FUZZ_CHECK(!ev.user_id && !ev.event_type && !ev.order && ev.id == 0);
        return;
    }
    check_event(&ev);
    round_trip(&ev);
    on_event_clear(&ev);
}

static void from_row(const uint8_t *data, size_t size)
{
    /* user_id \0 event_type \0 payload \0 created_at */
    char *copy = malloc(size + 1);
    FUZZ_CHECK(copy);
    memcpy(copy, data, size);
    copy[size] = '\0';
    const char *col[4] = {NULL, NULL, NULL, NULL};
    size_t k = 0;
    for (char *p = copy; k < 4 && p <= copy + size;) {
        col[k++] = p;
        p += strlen(p) + 1;
    }
    if (k < 3) {
        free(copy);
        return;
    }
    int64_t id = (int64_t)(fuzz_hash(data, size) % 1000000) + (size % 2 ? 1 : -1);
    on_event_t ev;
    int rc = on_event_from_row(id, col[0], col[1], col[2], col[3], &ev);
    FUZZ_CHECK(rc == 0 || rc == UV_EINVAL || rc == UV_ENOMEM);
    if (rc == 0) {
        FUZZ_CHECK(ev.id == id);
        FUZZ_CHECK(strcmp(ev.user_id, col[0]) == 0 && strcmp(ev.event_type, col[1]) == 0);
        check_event(&ev);
        round_trip(&ev);
        on_event_clear(&ev);
    } else {
        FUZZ_CHECK(id < 1 || !*col[0] || rc != 0);
    }
    free(copy);
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    cm_json_init();
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    long live = cm_alloc_live();
    parse(data, size);
    from_row(data, size);
    FUZZ_CHECK(cm_alloc_live() == live);
    return 0;
}
