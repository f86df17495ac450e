#include "app.h"

#include <sys/time.h>

const char *on_version(void);
const char *on_version(void)
{
    return MARKETS_VERSION;
}

double on_now(void)
{
    struct timeval tv;
    gettimeofday(&tv, NULL);
    return (double)tv.tv_sec + (double)tv.tv_usec / 1e6;
}
