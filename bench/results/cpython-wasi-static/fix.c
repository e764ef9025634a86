#include <stdlib.h>
#include <errno.h>
#include <stddef.h>
_Noreturn void pthread_exit(void *v) { (void)v; exit(0); }
char *gettext(const char *m) { return (char *)m; }
char *dgettext(const char *d, const char *m) { (void)d; return (char *)m; }
char *dcgettext(const char *d, const char *m, int c) { (void)d; (void)c; return (char *)m; }
char *textdomain(const char *d) { (void)d; return NULL; }
char *bindtextdomain(const char *d, const char *dir) { (void)d; (void)dir; return NULL; }
int memfd_create(const char *n, unsigned f) { (void)n; (void)f; errno = ENOSYS; return -1; }
int setgroups(size_t s, const void *l) { (void)s; (void)l; errno = ENOSYS; return -1; }
int epoll_create1(int f) { (void)f; errno = ENOSYS; return -1; }
int epoll_ctl(int a, int b, int c, void *e) { (void)a; (void)b; (void)c; (void)e; errno = ENOSYS; return -1; }
int epoll_wait(int a, void *e, int m, int t) { (void)a; (void)e; (void)m; (void)t; errno = ENOSYS; return -1; }
