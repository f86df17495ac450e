/*
 * dashboard.h: the operator page served at GET / (dashboard.html, embedded at build time by
 * embed.cmake so the page is edited as HTML, not as an escaped C string).
 */
#ifndef ON_DASHBOARD_H
#define ON_DASHBOARD_H

#include <stddef.h>

extern const unsigned char on_dashboard_html[];
extern const size_t on_dashboard_html_len;

#endif
