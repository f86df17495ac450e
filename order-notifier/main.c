#include "cm/log.h"

int main(void)
{
    cm_log_init("stub", CM_LOG_INFO, CM_LOG_JSON);
    cm_log_info("stub", NULL);
    return 0;
}
