/*
 * cm/redact.h: credentials out of what is logged or printed.
 *
 * DATABASE_URL and REDIS_URL may carry a password (scheme://user:password@host/...). Nothing
 * that reaches stderr or the logs may show it: not a start-up error about a malformed URL, not
 * a parser's message that quotes the URL back (libpq's do), not a log line naming a server.
 */
#ifndef CM_REDACT_H
#define CM_REDACT_H

#include <stddef.h>

/* What stands for a removed credential. */
#define CM_REDACTED "***"

/*
 * Writes `url` into `out` (outsz bytes, always NUL-terminated, cut when too long) with its
 * credentials replaced by CM_REDACTED: the password of the userinfo (postgresql://user:<***>
 * @host/db, without the brackets and the space) and the whole query when it names a password
 * (?password=... becomes ?<***>). A string uriparser cannot read as a URI but that could hold
 * a credential (an '@' or the word "password") loses everything between "scheme://" and its
 * last '@' (all of it after "scheme://" when a password parameter may follow); anything else
 * with one (a libpq key=value string) becomes CM_REDACTED alone. Strings without credentials
 * are copied as they are. Returns `out`.
 */
const char *cm_redact_url(const char *url, char *out, size_t outsz);

/*
 * Writes `msg`, a message about `source` (a URL or connection string: a parser's complaint
 * that may quote it), into `out` so that it shows nothing secret of `source`: `source` itself,
 * where it appears, becomes its cm_redact_url form; so does its password, wherever it
 * appears; any other double-quoted part of `msg` is kept only when it is a keyword of
 * `source` (letters, digits and '_' starting a token there, followed by '=': an unknown option
 * name) or one punctuation character, and becomes "***" otherwise. Returns `out`.
 */
const char *cm_redact_message(const char *msg, const char *source, char *out, size_t outsz);

#endif
