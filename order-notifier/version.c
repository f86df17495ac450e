/* Placeholder so on_core has a source until the notifier's modules land. */
const char *on_version(void);
const char *on_version(void)
{
    return MARKETS_VERSION;
}
