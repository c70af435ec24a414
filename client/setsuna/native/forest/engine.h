/* setsuna_forest: the compiled forests a verified version folder holds, loaded and run.

   An engine is one of the libraries build_engines compiles (tl2cgen's
   setsuna_predict_batch, lleaves' forest_root) or the build's "switch" of
   the two (the small-batch engine below threshold_rows rows, the large-batch
   one from there on). Loading takes the memfd verify.c filled with exactly the
   bytes that were hashed, so what runs is what the seal signed. */
#ifndef SETSUNA_FOREST_ENGINE_H
#define SETSUNA_FOREST_ENGINE_H

#include <stddef.h>
#include <stdint.h>

#include "verify.h"

typedef struct sf_lib {
  int kind; /* SF_ENGINE_TL2CGEN or SF_ENGINE_LLEAVES; 0 = unused */
  void* handle;
  int fd; /* the memfd the library was loaded from, kept open while it is mapped */
  void (*tl2cgen)(const float* x, int64_t n_rows, float* out);
  void (*lleaves)(double* x, double* out, int32_t start, int32_t end);
} sf_lib;

typedef struct sf_engine {
  int n_features;
  int threshold_rows; /* 0: one engine */
  sf_lib small, large;
} sf_engine;

/* Per-instance buffers (lleaves computes in double); grown on demand, never shared. */
typedef struct sf_scratch {
  double* x;
  double* y;
  size_t rows;
} sf_scratch;

/* Load the engine(s) of a verified manifest; takes ownership of its lib fds. 0 or -1 + err. */
int sf_engine_open(sf_engine* engine, sf_manifest* manifest, char* err, size_t err_len);
void sf_engine_close(sf_engine* engine);
/* Score n_rows C-contiguous float32 rows into out[n_rows]. Thread-safe across
   instances (each has its own scratch). 0, or -1 + err (nothing written that
   may be used). */
int sf_engine_run(const sf_engine* engine, sf_scratch* scratch, const float* x, int64_t n_rows,
                  float* out, char* err, size_t err_len);
void sf_scratch_free(sf_scratch* scratch);

#endif
