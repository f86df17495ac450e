/*
 * channel_check.h: is PG_CHANNEL the channel the orders trigger NOTIFYs?
 *
 * The trigger (deploy/sql/002_order_events_trigger.sql) NOTIFYs
 * coalesce(nullif(current_setting('markets.order_channel', true), ''), 'order_events'),
 * evaluated in the writer's session: the database's or role's default (ALTER DATABASE ... SET
 * markets.order_channel) unless the session sets its own. A notifier LISTENing on any other
 * channel receives no live event at all, and nothing else would say so.
 *
 * So whenever the LISTEN session comes up (start-up and every reconnect) the same expression
 * is evaluated in a session of the notifier's own (a pool connection: same database, same
 * role, so the same defaults a writer gets), and a mismatch makes the replica not ready, with
 * an error log naming both values. A writer that sets markets.order_channel in its own session
 * is not seen: deployments set it at the database level (README, docs/CONFIGURATION.md).
 */
#ifndef ON_CHANNEL_CHECK_H
#define ON_CHANNEL_CHECK_H

#include "cm/pg.h"

#include <uv.h>

/* The trigger's expression, character for character. */
#define ON_CHANNEL_CHECK_SQL                                                                       \
    "SELECT coalesce(nullif(current_setting('markets.order_channel', true), ''), "                 \
    "'order_events')"

/* Delay before asking again after a failed query (no pool connection yet, a timeout), ms. */
#define ON_CHANNEL_CHECK_RETRY_MS 250

typedef struct on_channel_check on_channel_check_t;

/* Creates the check for `channel` (PG_CHANNEL; borrowed, must outlive the check) on `pg`
 * (borrowed). Nothing runs until on_channel_check_run. Returns 0 and *out, or UV_ENOMEM. */
int on_channel_check_new(uv_loop_t *loop, cm_pg_t *pg, const char *channel,
                         on_channel_check_t **out);

/* Asks the database again (the LISTEN session just came up). The result of the previous check
 * stands until the answer arrives; a failed query is retried every ON_CHANNEL_CHECK_RETRY_MS.
 * NULL is a no-op. */
void on_channel_check_run(on_channel_check_t *cc);

/* NULL when the last answer matched PG_CHANNEL; otherwise why this replica is not ready (a
 * one-line text naming both channels, or that no answer has arrived yet). Borrowed until the
 * next answer. NULL `cc`: NULL. */
const char *on_channel_check_problem(const on_channel_check_t *cc);

/* Stops and frees the check (later, once its timer is closed and a query in flight has
 * answered: call it before the cm_pg_t is closed). NULL is a no-op; so is a second call. */
void on_channel_check_close(on_channel_check_t *cc);

#endif
