/*
 * cm/log.h: structured logs, one line per event on stderr.
 *
 * JSON format: {"ts":"2026-11-29T20:00:00.123Z","level":"error","service":"price-service",
 * "msg":"redis unavailable","error":"Connection refused"} (encoded by cJSON; bytes that are not
 * well-formed UTF-8 become U+FFFD, so every line is valid JSON). Text format, logfmt-like:
 * `2026-11-29T20:00:00.123Z ERROR price-service redis unavailable error="Connection refused"`.
 * A value is written bare when it is printable ASCII without space, '=', '"' or '\', else in
 * double quotes with \" \\ \n \r \t and \xHH (other controls, invalid UTF-8) escaped, so a
 * value (a token's subject, a server's error text) can neither end its field early nor start
 * a new line. A NULL value is `key=` with nothing after it; an empty one is `key=""`.
 */
#ifndef CM_LOG_H
#define CM_LOG_H

#include <stdio.h>

typedef enum { CM_LOG_DEBUG = 0, CM_LOG_INFO, CM_LOG_WARN, CM_LOG_ERROR } cm_log_level_t;
typedef enum { CM_LOG_JSON = 0, CM_LOG_TEXT } cm_log_format_t;

/* Parses "debug", "info", "warn" or "error". Returns 0 or UV_EINVAL. */
int cm_log_level_parse(const char *s, cm_log_level_t *out);
/* Parses "json" or "text". Returns 0 or UV_EINVAL. */
int cm_log_format_parse(const char *s, cm_log_format_t *out);
/* Name of a level as written in logs ("info"). */
const char *cm_log_level_name(cm_log_level_t level);

/* Sets the service name (borrowed: must outlive logging), the minimum level and the format. */
void cm_log_init(const char *service, cm_log_level_t level, cm_log_format_t format);
/* Changes the minimum level at run time (SIGHUP reload). */
void cm_log_set_level(cm_log_level_t level);
/* Non-zero when a message at `level` would be written; lets callers skip building fields. */
int cm_log_enabled(cm_log_level_t level);
/* Redirects output (tests); NULL restores stderr. The stream is borrowed. */
void cm_log_set_stream(FILE *stream);

/*
 * Writes one log line: `msg` plus key/value pairs of strings ending with a NULL key, e.g.
 * cm_log(CM_LOG_ERROR, "redis unavailable", "error", errstr, "addr", "127.0.0.1:6379", NULL).
 * A NULL value is written as JSON null. Never fails visibly: on allocation failure it writes
 * the message alone.
 */
void cm_log(cm_log_level_t level, const char *msg, ...) __attribute__((sentinel));

#define cm_log_debug(...) cm_log(CM_LOG_DEBUG, __VA_ARGS__)
#define cm_log_info(...) cm_log(CM_LOG_INFO, __VA_ARGS__)
#define cm_log_warn(...) cm_log(CM_LOG_WARN, __VA_ARGS__)
#define cm_log_error(...) cm_log(CM_LOG_ERROR, __VA_ARGS__)

#endif
