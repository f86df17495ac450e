/*
 * price_json.h: the JSON body of one price, as the contract shows it.
 */
#ifndef PS_PRICE_JSON_H
#define PS_PRICE_JSON_H

#include "cm/buf.h"

/* One oracle_prices row as Postgres' text output gives it (decimals as stored, never floats). */
typedef struct ps_price_row {
    const char *market;
    const char *price;
    const char *confidence;   /* NULL for SQL NULL: written as JSON null */
    const char *publish_time; /* RFC 3339 UTC, formatted by the query */
    const char *source;
} ps_price_row_t;

/*
 * Appends {"market":..,"price":"..","confidence":"..","publish_time":"..","source":".."} to
 * `out` (encoded by cJSON: decimals stay strings exactly as stored). Returns 0 or UV_ENOMEM.
 */
int ps_price_json(const ps_price_row_t *row, cm_buf_t *out);

#endif
