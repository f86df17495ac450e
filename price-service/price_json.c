#include "price_json.h"

#include <cjson/cJSON.h>
#include <uv.h>

int ps_price_json(const ps_price_row_t *row, cm_buf_t *out)
{
    cJSON *o = cJSON_CreateObject();
    if (!o)
        return UV_ENOMEM;
    int ok = cJSON_AddStringToObject(o, "market", row->market) &&
             cJSON_AddStringToObject(o, "price", row->price) &&
             (row->confidence ? cJSON_AddStringToObject(o, "confidence", row->confidence)
                              : cJSON_AddNullToObject(o, "confidence")) &&
             cJSON_AddStringToObject(o, "publish_time", row->publish_time) &&
             cJSON_AddStringToObject(o, "source", row->source);
    char *text = ok ? cJSON_PrintUnformatted(o) : NULL;
    cJSON_Delete(o);
    if (!text)
        return UV_ENOMEM;
    int rc = cm_buf_puts(out, text);
    cJSON_free(text);
    return rc;
}
