#include "cm/error.h"

#include <uv.h>

/* uv_strerror allocates (and never frees) the text of a code it does not know, so only the
 * codes of its own table are handed to it. */
#define CM_UV_KNOWN(name, text) case UV_##name:

const char *cm_strerror(int err)
{
    switch (err) {
    case 0:
        return "ok";
    case CM_ESERVER:
        return "server error";
    case CM_EREADONLY:
        return "server is read-only";
    case CM_EPROTO:
        return "protocol error";
        UV_ERRNO_MAP(CM_UV_KNOWN)
        return uv_strerror(err);
    default:
        return "unknown error";
    }
}
