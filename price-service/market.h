/*
 * market.h: market identifiers as the contract defines them.
 */
#ifndef PS_MARKET_H
#define PS_MARKET_H

#include <stddef.h>

/* Longest market id in bytes (contract: 1 to 64 of A-Z a-z 0-9 . _ : -). */
#define PS_MARKET_MAX 64
/* Most markets one batch request may ask for. */
#define PS_BATCH_MAX 100

/* Returns 1 when `id` (`len` bytes, not necessarily NUL-terminated) is a valid market id. */
int ps_market_valid(const char *id, size_t len);

/*
 * Splits a comma list of market ids ("A,B,C") into `out` (NUL-terminated copies written into
 * `storage`, which must hold at least strlen(list)+1 bytes; both borrowed from the caller).
 * Duplicates are dropped, order is kept. Returns the number of ids (1..max), UV_EINVAL when an
 * id is invalid or the list is empty, or UV_E2BIG when it names more than `max` markets.
 */
int ps_market_split(const char *list, char *storage, const char **out, int max);

#endif
