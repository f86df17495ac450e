/*
 * cm/config.h: 12-factor configuration (https://12factor.net/config) from the environment,
 * validated once at startup.
 *
 * A bad value is a startup error that names the variable and says what was expected, e.g.
 * "CACHE_TTL_MS: expected an integer from 1 to 60000, got 'abc'"; the daemon prints c->error on
 * one line and exits 2 (docs/CONFIGURATION.md). Lookups go through a function so tests inject
 * values. An optional KEY=VALUE file (CONFIG_FILE, re-read on SIGHUP) is consulted before the
 * lookup so it can override the environment for the reloadable keys.
 *
 * Typical use:
 *     cm_config_t c;
 *     cm_config_init_env(&c);
 *     cm_config_int(&c, "CACHE_TTL_MS", 1000, 1, 60000, &ttl);
 *     cm_config_bool(&c, "CACHE_ENABLED", 1, &enabled);
 *     if (c.failed) { fprintf(stderr, "%s\n", c.error); return 2; }
 */
#ifndef CM_CONFIG_H
#define CM_CONFIG_H

#include <stddef.h>

/* Returns the raw value of `key` or NULL when unset. The string is borrowed: it must stay
 * valid until the getter that asked for it returns (getters that hand strings out, such as
 * cm_config_str, pass this pointer through, so it should live as long as the caller uses it). */
typedef const char *(*cm_config_lookup_fn)(const char *key, void *ud);

struct cm_config_file;

/* Room for any error a config getter or CONFIG_FILE reports, its explanation whole: quoted
 * values, keys and paths are cut to fit (reload callers size their buffers with it). */
#define CM_CONFIG_ERROR_MAX 1024

typedef struct cm_config {
    cm_config_lookup_fn lookup; /* getenv by default */
    void *ud;                   /* passed to lookup; borrowed */
    /* Optional overrides, consulted first when set. Borrowed: the caller loads and frees it. */
    struct cm_config_file *file;
    /* Optional NULL-terminated allow-list of keys the file may override (the reloadable ones:
     * CACHE_ENABLED, CACHE_TTL_MS, LOG_LEVEL). NULL: the file is consulted for every key.
     * Borrowed. */
    const char *const *file_keys;
    char error[CM_CONFIG_ERROR_MAX]; /* the first error, e.g. "CACHE_TTL_MS: expected an integer
                        from 1 to 60000, got 'abc'"; empty when none */
    int failed;                      /* non-zero once any getter failed */
    /* cm_config_listen accepts port 0 (an ephemeral port, for tests) when non-zero. Default 0. */
    int allow_port_zero;
    /* APP_ENV=production (set by cm_config_app_env): settings with only a development default
     * become required. */
    int production;
    /* The CONFIG_FILE loaded by cm_config_use_file, freed by cm_config_release. */
    struct cm_config_file *owned_file;
} cm_config_t;

/* Initialises `c` to read the process environment (getenv), with no file and no error. */
void cm_config_init_env(cm_config_t *c);
/* Initialises `c` to read through `lookup` (called with `ud`, borrowed), no file, no error. */
void cm_config_init(cm_config_t *c, cm_config_lookup_fn lookup, void *ud);

/*
 * Getters. For all of them: a value that is absent or empty yields the default (which is not
 * validated beyond what is needed to produce the output). Leading and trailing spaces and tabs
 * of a value are ignored. Return 0, or UV_EINVAL with c->error set to a one-line message naming
 * the key (only the first error is kept; later calls still fill their outputs with defaults so
 * the caller may read every setting and report at the end). On error the output holds the
 * default.
 */

/* A string. *out is borrowed from the environment/file/`def` (valid until the file is freed or
 * the environment changes); surrounding whitespace is NOT trimmed for strings, since secrets
 * and URLs are taken as written. */
int cm_config_str(cm_config_t *c, const char *key, const char *def, const char **out);
/* A boolean: true/false, 1/0, yes/no, on/off, case-insensitive. *out is 1 or 0. */
int cm_config_bool(cm_config_t *c, const char *key, int def, int *out);
/* A decimal integer (optional sign, digits only, whole string; no hex, no octal, no
 * suffixes) within [min, max]. */
int cm_config_int(cm_config_t *c, const char *key, long def, long min, long max, long *out);
/* One of the NULL-terminated `allowed` strings (case-sensitive, as LOG_LEVEL is written in
 * lower case by convention). *index_out is its index. `def` must be one of `allowed`; an
 * unknown default is reported as an error too (a programming error caught at startup). */
int cm_config_enum(cm_config_t *c, const char *key, const char *def, const char *const *allowed,
                   int *index_out);
/* A listen address: "host:port" or "[v6]:port" (RFC 3986 authority form for IPv6 literals).
 * The host (without brackets) is copied into `host` (hostsz bytes including the NUL; a host
 * that does not fit is an error), the port into *port. Port 1..65535, or 0 too when
 * c->allow_port_zero. The host must be non-empty and is not resolved here. */
int cm_config_listen(cm_config_t *c, const char *key, const char *def, char *host, size_t hostsz,
                     int *port);
/* A comma list ("a, b,c") into a new array of trimmed, non-empty strings. Empty elements are
 * an error ("a,,b"). An absent/empty value with def NULL or "" gives *items NULL, *count 0.
 * The caller frees the array with cm_config_list_free (also on error, where it holds the
 * parsed default). Returns UV_ENOMEM on allocation failure (also recorded in c->error). */
int cm_config_list(cm_config_t *c, const char *key, const char *def, char ***items, size_t *count);
/* Frees an array from cm_config_list; NULL is a no-op. */
void cm_config_list_free(char **items, size_t count);

/*
 * KEY=VALUE file (dotenv-like subset). One setting a line; '#' starts a comment line; blank
 * lines are skipped; whitespace around the key and the value is ignored; the value may be
 * wrapped in double quotes (kept verbatim inside, no escapes). A key is [A-Za-z_][A-Za-z0-9_]*.
 * A later line for the same key wins. A line without '=', with a bad key, with an unterminated
 * quote or with text after the closing quote is an error naming "path:line".
 */
typedef struct cm_config_file cm_config_file_t;

/* Reads `path` (borrowed). On success *out is a new file object the caller frees with
 * cm_config_file_free, and 0 is returned. On failure *out is NULL, a one-line message goes into
 * err (errsz bytes, may be NULL/0), and the return is UV_EINVAL (malformed), UV_ENOMEM, or the
 * negative errno of open/read (UV_ENOENT...). */
int cm_config_file_load(const char *path, cm_config_file_t **out, char *err, size_t errsz);
/* Value of `key` in the file or NULL; borrowed until cm_config_file_free. */
const char *cm_config_file_get(const cm_config_file_t *f, const char *key);
/* Frees the file object; NULL is a no-op. */
void cm_config_file_free(cm_config_file_t *f);

/* ---- what both daemons read the same way ---------------------------------------------- */

/* Reads APP_ENV: "development" (the default) or "production", which sets c->production.
 * Returns 0, or UV_EINVAL with c->error naming APP_ENV for any other value. */
int cm_config_app_env(cm_config_t *c);

/* Validates a value; returns 0, or non-zero after writing why it is wrong into `why`. */
typedef int (*cm_config_check_fn)(const char *value, char *why, size_t whysz);

/*
 * A string validated by `check` (a URL, a connection string). `dev_default` applies when the
 * value is absent, except in production, where the setting is then required. Returns 0 or
 * UV_EINVAL with c->error "KEY: <why>" or "KEY: required when APP_ENV=production". <why> goes
 * through cm_redact_message, so a check that quotes the value back cannot print its password.
 */
int cm_config_checked(cm_config_t *c, const char *key, const char *dev_default,
                      cm_config_check_fn check, const char **out);

/* Records "KEY: <what>" (unless an earlier error is kept), for rules no getter covers.
 * Returns UV_EINVAL. */
int cm_config_reject(cm_config_t *c, const char *key, const char *what);

/* Fewest distinct byte values cm_config_weak_secret accepts. */
#define CM_CONFIG_SECRET_MIN_DISTINCT 8

/*
 * Checks a production secret. Returns 0 when `value` is fit, else UV_EINVAL with `why`
 * (whysz bytes) set to a phrase for "KEY: <why>" ("too short: ..."): it is one of the
 * NULL-terminated `known` values (defaults and examples published in the repository; compared with
 * surrounding whitespace ignored), a "change-me" placeholder, shorter than `min_len` bytes, only
 * whitespace, or has fewer than CM_CONFIG_SECRET_MIN_DISTINCT distinct bytes. `why` never quotes
 * the value.
 */
int cm_config_weak_secret(const char *value, size_t min_len, const char *const *known, char *why,
                          size_t whysz);

/*
 * Loads the file named by the CONFIG_FILE environment variable, when set, as c->file, limited
 * to `file_keys` (borrowed, NULL-terminated: the reloadable keys). Returns 0, or UV_EINVAL
 * with c->error "CONFIG_FILE: <path:line: problem>". Free with cm_config_release().
 */
int cm_config_use_file(cm_config_t *c, const char *const *file_keys);
/* The same for the file at `path` (a SIGHUP reload). A key of the file that is not in
 * `file_keys` is an error too ("<path>: KEY is not a key this file can set (it can set A, B)"):
 * a typo in a file of overrides must not pass unnoticed, nor a key read at start-up only. */
int cm_config_use_file_at(cm_config_t *c, const char *path, const char *const *file_keys);
/* Frees what cm_config_use_file loaded; strings read from it are invalid afterwards. */
void cm_config_release(cm_config_t *c);

#endif
