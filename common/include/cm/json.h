/*
 * cm/json.h: cJSON on the project's allocator.
 *
 * cJSON allocates with malloc/free unless told otherwise. cm_json_init() hands it cm_malloc and
 * cm_free, so that JSON trees and printed text count in cm_alloc_live() (a missing cJSON_Delete
 * shows up in the unit tests' leak checks) and cm_alloc_fail_after() reaches cJSON's own
 * allocations (its error paths get tested too). cJSON's hooks are process-wide.
 */
#ifndef CM_JSON_H
#define CM_JSON_H

/* Routes cJSON's allocations through cm_malloc/cm_free. Call once, at start-up, before any
 * other cJSON call: a block allocated with one allocator must not be freed by the other. */
void cm_json_init(void);

#endif
