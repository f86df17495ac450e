#include "cm/json.h"

#include "cm/alloc.h"

#include <cjson/cJSON.h>

void cm_json_init(void)
{
    /* With hooks other than malloc/free, cJSON grows printed text by allocate, copy and free
     * instead of realloc: nothing else changes. */
    cJSON_Hooks hooks = {cm_malloc, cm_free};
    cJSON_InitHooks(&hooks);
}
