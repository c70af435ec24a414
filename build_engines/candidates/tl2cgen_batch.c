/* setsuna: batch entry point for a tl2cgen forest, the per-row form.

   Compiled as its own file next to tl2cgen's generated code when predict()
   does not have the shape tl2cgen_blocked.c needs. One call scores a
   C-contiguous float32 batch: NaN becomes "missing" (tl2cgen's DMatrix
   convention), each row is scored by the generated predict() with the
   model's postprocessor, and the last output (the only one, or class 1 of
   two) is written as float32; a model of 3 or more classes writes all of
   them, SETSUNA_N_WRITE per row. A float widened to double has its low 29
   mantissa bits zero, so a present value can never alias the union's missing
   marker (-1).

   A template: build_engines/candidates/trees_tl2cgen.py drops this comment
   and replaces each @name@ (n_feature, leaf_type, batch_symbol,
   nfeature_symbol, noutput_symbol); the whole file, comment included, is part of the compile
   cache key. */
#include "header.h"

#define SETSUNA_N_FEATURE @n_feature@
#define SETSUNA_N_OUT (N_TARGET * MAX_N_CLASS)
#define SETSUNA_N_WRITE (SETSUNA_N_OUT > 2 ? SETSUNA_N_OUT : 1)

int32_t @nfeature_symbol@(void) { return SETSUNA_N_FEATURE; }
int32_t @noutput_symbol@(void) { return SETSUNA_N_WRITE; }

void @batch_symbol@(const float* x, int64_t n_rows, float* out) {
  union Entry row[SETSUNA_N_FEATURE];
  @leaf_type@ result[SETSUNA_N_OUT];
  for (int64_t i = 0; i < n_rows; ++i) {
    const float* r = x + i * SETSUNA_N_FEATURE;
    for (int j = 0; j < SETSUNA_N_FEATURE; ++j) {
      if (isnan(r[j])) {
        row[j].missing = -1;
      } else {
        row[j].fvalue = r[j];
      }
    }
    for (int k = 0; k < SETSUNA_N_OUT; ++k) {
      result[k] = 0;
    }
    predict(row, 0, result);
    for (int k = 0; k < SETSUNA_N_WRITE; ++k) {
      out[i * SETSUNA_N_WRITE + k] = (float)result[SETSUNA_N_OUT - SETSUNA_N_WRITE + k];
    }
  }
}
