"""Credentials out of what the dev-stack scripts print (the daemons' rules, cm/redact.h).

DATABASE_URL carries the Postgres password in the compose stack, and libpq's complaints about
a malformed one (psycopg2 passes them on) quote it back. redact_url() masks a URL's password;
redact() rewrites a message about a URL or connection string so that it shows none of it.
"""
import re
import urllib.parse

MASK = "***"


def _password_span(url):
    """(start, end) of the password in `url`, or None (urllib reads the userinfo)."""
    try:
        parts = urllib.parse.urlsplit(url)
        if not parts.scheme or not parts.netloc or parts.password is None:
            return None
    except ValueError:
        return None
    userinfo = parts.netloc.rpartition("@")[0]
    start = url.index("//") + 2 + userinfo.index(":") + 1
    return start, start + len(userinfo) - userinfo.index(":") - 1


def redact_url(url):
    """`url` with its password (and a query that names one) replaced by ***. A string urllib
    cannot read that could hold a credential loses everything that could be one."""
    try:
        parts = urllib.parse.urlsplit(url)
        readable = bool(parts.scheme and parts.netloc)
    except ValueError:
        readable = False
    if not readable:
        scheme, sep, rest = url.partition("://")
        if not sep:
            return MASK if ("@" in url or "password" in url.lower()) else url
        if "password" in rest.lower():
            return f"{scheme}://{MASK}"
        if "@" in rest:
            return f"{scheme}://{MASK}@{rest.rpartition('@')[2]}"
        return url
    out = url
    span = _password_span(url)
    if span:
        out = url[:span[0]] + MASK + url[span[1]:]
    if parts.query and "password" in parts.query.lower():
        out = out.replace("?" + parts.query, "?" + MASK, 1)
    return out


def redact(message, source):
    """`message` about `source` with nothing secret of it: `source` and its password become
    masked, and a double-quoted token (libpq quotes what it choked on) stays only when it is
    an option name of `source` (followed by '=') or one punctuation character."""
    if not source:
        return message
    masked = redact_url(source)
    span = _password_span(source)
    password = source[span[0]:span[1]] if span else None

    def quoted(m):
        tok = m.group(1)
        if tok in (source, masked):
            return f'"{masked}"'
        if (len(tok) == 1 and not tok.isalnum()) or (tok and tok + "=" in source):
            return m.group(0)
        return f'"{MASK}"'

    out = re.sub(r'"([^"\n]*)"', quoted, message.replace(source, masked))
    if password:
        out = out.replace(password, MASK)
    return out
