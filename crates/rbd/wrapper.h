/* The headers bindgen reads (from librbd-dev / librados-dev). */
#include <rados/librados.h>
#include <rbd/librbd.h>
