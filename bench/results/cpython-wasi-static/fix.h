#ifndef SEEDFLOW_FIX_H
#define SEEDFLOW_FIX_H
_Noreturn void pthread_exit(void *);
#endif
