/* setsuna: cache-blocked batch entry point for a tl2cgen forest.

   Appended to tl2cgen's main.c when its predict() is the usual prologue
   (quantisation), one call per tree unit, epilogue (base scores,
   postprocessor): the same steps, with each unit run over a block of rows
   before the next, so the unit's code stays in cache across the block
   instead of the whole forest streaming through it for every row. Same
   inputs, same arithmetic per row, same output as tl2cgen_batch.c (all
   classes of a model of 3 or more, SETSUNA_N_WRITE per row). The block
   buffers are on the heap (a serving thread's stack may be small); if that
   allocation fails, rows are scored one at a time on the stack.

   A template: build_engines/candidates/trees_tl2cgen.py drops this comment
   and replaces each @name@ (n_feature, leaf_type, block, prologue, epilogue,
   unit_loops, batch_symbol, nfeature_symbol, noutput_symbol); the body starts with the blank
   line below, which separates it from main.c. The whole file, comment
   included, is part of the compile cache key. */

#define SETSUNA_N_FEATURE @n_feature@
#define SETSUNA_N_OUT (N_TARGET * MAX_N_CLASS)
#define SETSUNA_N_WRITE (SETSUNA_N_OUT > 2 ? SETSUNA_N_OUT : 1)
#define SETSUNA_BLOCK @block@

int32_t @nfeature_symbol@(void) { return SETSUNA_N_FEATURE; }
int32_t @noutput_symbol@(void) { return SETSUNA_N_WRITE; }

static void setsuna_prologue(union Entry* data, int pred_margin, @leaf_type@* result) {
@prologue@
}

static void setsuna_epilogue(union Entry* data, int pred_margin, @leaf_type@* result) {
@epilogue@
}

static void setsuna_fill(const float* r, union Entry* row, @leaf_type@* result) {
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
  setsuna_prologue(row, 0, result);
}

static void setsuna_block(union Entry (*rows)[SETSUNA_N_FEATURE],
                          @leaf_type@ (*res)[SETSUNA_N_OUT], int m) {
@unit_loops@
}

void @batch_symbol@(const float* x, int64_t n_rows, float* out) {
  int64_t cap = n_rows < SETSUNA_BLOCK ? n_rows : SETSUNA_BLOCK;
  union Entry (*rows)[SETSUNA_N_FEATURE] = malloc(sizeof(*rows) * (size_t)(cap > 0 ? cap : 1));
  @leaf_type@ (*res)[SETSUNA_N_OUT] = malloc(sizeof(*res) * (size_t)(cap > 0 ? cap : 1));
  if (rows == NULL || res == NULL) {
    free(rows);
    free(res);
    union Entry row[1][SETSUNA_N_FEATURE];
    @leaf_type@ result[1][SETSUNA_N_OUT];
    for (int64_t i = 0; i < n_rows; ++i) {
      setsuna_fill(x + i * SETSUNA_N_FEATURE, row[0], result[0]);
      setsuna_block(row, result, 1);
      setsuna_epilogue(row[0], 0, result[0]);
      for (int k = 0; k < SETSUNA_N_WRITE; ++k) {
        out[i * SETSUNA_N_WRITE + k] = (float)result[0][SETSUNA_N_OUT - SETSUNA_N_WRITE + k];
      }
    }
    return;
  }
  for (int64_t s = 0; s < n_rows; s += cap) {
    int m = (int)(n_rows - s < cap ? n_rows - s : cap);
    for (int i = 0; i < m; ++i) {
      setsuna_fill(x + (s + i) * SETSUNA_N_FEATURE, rows[i], res[i]);
    }
    setsuna_block(rows, res, m);
    for (int i = 0; i < m; ++i) {
      setsuna_epilogue(rows[i], 0, res[i]);
      for (int k = 0; k < SETSUNA_N_WRITE; ++k) {
        out[(s + i) * SETSUNA_N_WRITE + k] = (float)res[i][SETSUNA_N_OUT - SETSUNA_N_WRITE + k];
      }
    }
  }
  free(rows);
  free(res);
}
