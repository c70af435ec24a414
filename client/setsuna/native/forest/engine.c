/* setsuna_forest: loading and running the compiled forests (see engine.h). */
#include "engine.h"

#include <dlfcn.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define SF_TL2CGEN_BATCH "setsuna_predict_batch"
#define SF_TL2CGEN_NFEATURE "setsuna_num_feature"
#define SF_LLEAVES_ENTRY "forest_root"

/* dlopen() recognises an already-loaded object by its path string, and fd
   numbers are reused: "/proc/self/fd/12" may still name another model's
   library. Such a path is skipped by dup()ing the fd to a fresh number. */
static void* open_fd(int* fd, char* err, size_t err_len, const char* lib) {
  int extra[16];
  int n_extra = 0;
  void* handle = NULL;
  char path[64];
  for (;;) {
    snprintf(path, sizeof path, "/proc/self/fd/%d", *fd);
    void* taken = dlopen(path, RTLD_NOW | RTLD_LOCAL | RTLD_NOLOAD);
    if (taken == NULL) break;
    dlclose(taken);
    if (n_extra == 16) {
      snprintf(err, err_len, "%s: could not find a free /proc/self/fd path to load it from", lib);
      goto done;
    }
    extra[n_extra++] = *fd;
    *fd = dup(*fd);
    if (*fd < 0) {
      *fd = extra[--n_extra];
      snprintf(err, err_len, "%s: dup failed while loading", lib);
      goto done;
    }
  }
  handle = dlopen(path, RTLD_NOW | RTLD_LOCAL);
  if (handle == NULL) {
    const char* why = dlerror();
    snprintf(err, err_len, "%s: cannot load the verified library: %s; rebuild the model", lib,
             why ? why : "unknown dlopen error");
  }
done:
  for (int i = 0; i < n_extra; ++i) close(extra[i]);
  return handle;
}

static int open_lib(sf_lib* lib, sf_engine_spec* spec, int n_features, char* err,
                    size_t err_len) {
  memset(lib, 0, sizeof *lib);
  lib->fd = spec->lib_fd;
  spec->lib_fd = -1; /* ours now */
  lib->kind = spec->kind;
  if (lib->fd < 0) {
    snprintf(err, err_len, "%s: no verified bytes to load (internal error)", spec->lib);
    return -1;
  }
  lib->handle = open_fd(&lib->fd, err, err_len, spec->lib);
  if (lib->handle == NULL) return -1;
  if (spec->kind == SF_ENGINE_TL2CGEN) {
    int32_t (*num_feature)(void) = (int32_t(*)(void))dlsym(lib->handle, SF_TL2CGEN_NFEATURE);
    lib->tl2cgen = (void (*)(const float*, int64_t, float*))dlsym(lib->handle, SF_TL2CGEN_BATCH);
    if (num_feature == NULL || lib->tl2cgen == NULL) {
      snprintf(err, err_len,
               "%s has no %s/%s entry point (built before setsuna's batch entry point, or not "
               "by build_engines); rebuild the model with `make build-engines`",
               spec->lib, SF_TL2CGEN_BATCH, SF_TL2CGEN_NFEATURE);
      return -1;
    }
    int32_t have = num_feature();
    if (have != n_features) {
      snprintf(err, err_len,
               "%s scores rows of %d features but the manifest's schema has %d; the folder "
               "mixes two builds: rebuild the model",
               spec->lib, (int)have, n_features);
      return -1;
    }
  } else if (spec->kind == SF_ENGINE_LLEAVES) {
    lib->lleaves =
        (void (*)(double*, double*, int32_t, int32_t))dlsym(lib->handle, SF_LLEAVES_ENTRY);
    if (lib->lleaves == NULL) {
      snprintf(err, err_len, "%s has no %s symbol; rebuild the model", spec->lib,
               SF_LLEAVES_ENTRY);
      return -1;
    }
    if (spec->n_features != n_features) {
      snprintf(err, err_len, "%s: n_features %d differs from the schema's %d; rebuild",
               spec->lib, spec->n_features, n_features);
      return -1;
    }
  } else {
    snprintf(err, err_len, "%s: unknown engine kind %d", spec->lib, spec->kind);
    return -1;
  }
  return 0;
}

static void close_lib(sf_lib* lib) {
  if (lib->handle != NULL) dlclose(lib->handle);
  if (lib->fd >= 0 && lib->kind != 0) close(lib->fd);
  memset(lib, 0, sizeof *lib);
  lib->fd = -1;
}

int sf_engine_open(sf_engine* engine, sf_manifest* manifest, char* err, size_t err_len) {
  memset(engine, 0, sizeof *engine);
  engine->small.fd = engine->large.fd = -1;
  engine->n_features = manifest->n_features;
  engine->threshold_rows = manifest->threshold_rows;
  if (open_lib(&engine->small, &manifest->small, manifest->n_features, err, err_len) != 0 ||
      (manifest->large.kind != 0 &&
       open_lib(&engine->large, &manifest->large, manifest->n_features, err, err_len) != 0)) {
    sf_engine_close(engine);
    return -1;
  }
  return 0;
}

void sf_engine_close(sf_engine* engine) {
  close_lib(&engine->small);
  close_lib(&engine->large);
}

void sf_scratch_free(sf_scratch* scratch) {
  free(scratch->x);
  free(scratch->y);
  memset(scratch, 0, sizeof *scratch);
}

static int grow(sf_scratch* s, int64_t rows, int n_features) {
  if ((size_t)rows <= s->rows) return 0;
  size_t want = (size_t)rows;
  double* x = malloc(sizeof(double) * want * (size_t)n_features);
  double* y = malloc(sizeof(double) * want);
  if (x == NULL || y == NULL) {
    free(x);
    free(y);
    return -1;
  }
  free(s->x);
  free(s->y);
  s->x = x;
  s->y = y;
  s->rows = want;
  return 0;
}

static int run_lib(const sf_lib* lib, int n_features, sf_scratch* scratch, const float* x,
                   int64_t n, float* out, char* err, size_t err_len) {
  if (lib->kind == SF_ENGINE_TL2CGEN) {
    lib->tl2cgen(x, n, out);
    return 0;
  }
  if (n > INT32_MAX) {
    snprintf(err, err_len, "%lld rows overflow lleaves' int32 row index; split the batch",
             (long long)n);
    return -1;
  }
  if (grow(scratch, n, n_features) != 0) {
    snprintf(err, err_len, "out of memory for a %lld-row batch", (long long)n);
    return -1;
  }
  /* LightGBM compares thresholds in double, and so does lleaves' code. */
  size_t cells = (size_t)n * (size_t)n_features;
  for (size_t i = 0; i < cells; ++i) scratch->x[i] = (double)x[i];
  lib->lleaves(scratch->x, scratch->y, 0, (int32_t)n);
  for (int64_t i = 0; i < n; ++i) out[i] = (float)scratch->y[i];
  return 0;
}

int sf_engine_run(const sf_engine* engine, sf_scratch* scratch, const float* x, int64_t n_rows,
                  float* out, char* err, size_t err_len) {
  const sf_lib* lib = &engine->small;
  if (engine->threshold_rows > 0 && n_rows >= engine->threshold_rows) lib = &engine->large;
  if (run_lib(lib, engine->n_features, scratch, x, n_rows, out, err, err_len) != 0) return -1;
  /* A score is a decision's input: a non-finite one is an engine failure, never an answer. */
  for (int64_t i = 0; i < n_rows; ++i) {
    if (!isfinite(out[i])) {
      snprintf(err, err_len, "the engine returned a non-finite score (%g) for row %lld",
               (double)out[i], (long long)i);
      return -1;
    }
  }
  return 0;
}
