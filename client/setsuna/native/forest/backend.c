/* setsuna_forest: a Triton backend serving setsuna's compiled forests in-process.

   On the local target every engine call used to cross the Python-backend
   stub (shared memory and a message to another process, ~0.2 ms a request)
   for a forest that takes 4-25 us. This backend is the same contract as the
   Python wrapper (setsuna/backend.py), in C inside tritonserver:

   - at load (TRITONBACKEND_ModelInitialize): the version folder's seal and
     manifest are verified file by file (verify.c) and the engine libraries
     are loaded from memfds holding exactly the verified bytes (engine.c);
     the model config must match the manifest's schema;
   - per batch (TRITONBACKEND_ModelInstanceExecute): each request is checked
     alone (input present, FP32, [n, F], host memory, the NaN policy) and a
     bad one is answered INVALID_ARG naming the input (and the row and column
     of a non-finite value) while the rest of the batch is served; requests
     whose caller's deadline (setsuna.deadline) the batch cannot meet are
     answered UNAVAILABLE "setsuna-shed" and never computed; the good rows
     are scored by ONE engine call; an engine failure fails those requests
     with INTERNAL, never a default prediction.

   Copies: a batch of one request with one input buffer is scored straight
   from Triton's input buffer into its output buffer. A batch of several
   requests is gathered into one per-instance buffer first (the engines take
   one contiguous array, as Triton's own BackendInputCollector gathers), and
   the scores are copied into each response's output buffer.

   Instances are independent (own buffers, own batch-time estimate); the
   engine libraries are shared read-only by the model's instances. */
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "engine.h"
#include "json.h"
#include "triton_api.h"
#include "verify.h"

#define EXPORT __attribute__((visibility("default")))
#define SF_ERR 2048
#define INPUT_NAME "features"
#define OUTPUT_NAME "score"
#define DEADLINE_PARAMETER "setsuna_deadline_ns"
#define SHED_MARK "setsuna-shed"
#define DEFAULT_MARGIN_US 200.0
#define INITIAL_BATCH_US 500.0
#define EWMA_WEIGHT 0.2
#define SHED_FAMILY "setsuna_shed_total"
/* Word for word the Python wrapper's description: one metric family, two backends. */
#define SHED_DESCRIPTION                                                             \
  "Requests answered UNAVAILABLE without computing: the caller's deadline was nearer " \
  "than a batch takes (setsuna.deadline)"
/* The wrapper's failure counter, word for word too: Triton's nv_inference_request_failure
   counts these here (success=0 is reported) but not for the Python wrapper, so alerts and
   the dashboard read this family for both backends. */
#define FAILURE_FAMILY "setsuna_request_failures_total"
#define FAILURE_DESCRIPTION                                                            \
  "Requests answered with an error by the engine wrapper, by reason: engine (it raised " \
  "or answered non-finite scores) or refused (bad input)"

typedef struct model_state {
  char name[256];
  uint64_t version;
  sf_manifest manifest; /* schema and names; the engine owns the library fds */
  sf_engine engine;
  double margin_ns;
  TRITONSERVER_MetricFamily* shed_family;
  TRITONSERVER_Metric* shed_metric;
  TRITONSERVER_MetricFamily* failure_family;
  TRITONSERVER_Metric* failure_engine;  /* reason="engine" */
  TRITONSERVER_Metric* failure_refused; /* reason="refused" */
} model_state;

enum { REQ_DONE = 0, REQ_GOOD = 1 };

typedef struct instance_state {
  model_state* model;
  sf_scratch scratch;
  double batch_ns; /* running estimate of one engine call, for shedding */
  float* x;        /* gathered rows of a multi-request batch */
  float* y;
  size_t cap_rows;
  /* per-request bookkeeping, grown to the largest batch seen */
  TRITONBACKEND_Response** responses;
  TRITONBACKEND_Input** inputs;
  int64_t* rows;
  uint32_t* buffers;
  char* status;
  char* success;
  uint32_t cap_requests;
} instance_state;

static uint64_t now_ns(clockid_t clock) {
  struct timespec ts;
  clock_gettime(clock, &ts);
  return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static TRITONSERVER_Error* errorf(int code, const char* fmt, ...) {
  char msg[SF_ERR];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  return TRITONSERVER_ErrorNew(code, msg);
}

static void log_msg(int level, const char* fmt, ...) {
  char msg[SF_ERR];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  TRITONSERVER_Error* e = TRITONSERVER_LogMessage(level, __FILE__, __LINE__, msg);
  if (e != NULL) TRITONSERVER_ErrorDelete(e);
}

/* ------------------------------------------------------------------ backend */

EXPORT TRITONSERVER_Error* TRITONBACKEND_Initialize(TRITONBACKEND_Backend* backend) {
  (void)backend;
  uint32_t major = 0, minor = 0;
  TRITONSERVER_Error* err = TRITONBACKEND_ApiVersion(&major, &minor);
  if (err != NULL) return err;
  if (major != SF_API_MAJOR || minor < SF_API_MINOR) {
    return errorf(SF_ERROR_UNSUPPORTED,
                  "setsuna_forest was written against TRITONBACKEND API %d.%d but this server "
                  "has %u.%u; serve the forests on the Python wrapper "
                  "(make build-engines SETSUNA_NATIVE=0) or use a newer Triton",
                  SF_API_MAJOR, SF_API_MINOR, major, minor);
  }
  log_msg(SF_LOG_INFO, "setsuna_forest: TRITONBACKEND API %u.%u", major, minor);
  return NULL;
}

/* -------------------------------------------------------------------- model */

static const sj_value* member(const sj_value* obj, const char* key) {
  return obj == NULL ? NULL : sj_get(obj, key);
}

static const char* string_of(const sj_value* v) {
  return (v != NULL && v->type == SJ_STRING) ? v->str : NULL;
}

/* Triton's JSON for int64 fields (dims, max_batch_size) is a string or a number. */
static int int_of(const sj_value* v, long long* out) {
  if (v == NULL) return -1;
  if (v->type == SJ_NUMBER && v->is_int) {
    *out = v->i;
    return 0;
  }
  if (v->type == SJ_STRING) {
    char* end = NULL;
    *out = strtoll(v->str, &end, 10);
    return (end != v->str && *end == '\0') ? 0 : -1;
  }
  return -1;
}

/* The config Triton loaded must be the one the manifest describes: one FP32
   input "features" of [F] rows, one FP32 output "score" of [1], batching on. */
static TRITONSERVER_Error* check_config(model_state* m, const sj_value* cfg) {
  long long mbs = 0;
  if (int_of(member(cfg, "max_batch_size"), &mbs) != 0 || mbs < 1) {
    return errorf(SF_ERROR_INVALID_ARG,
                  "setsuna_forest: %s: max_batch_size must be >= 1 (the backend serves "
                  "batched [n, F] requests); republish the model with build_engines",
                  m->name);
  }
  const sj_value* inputs = member(cfg, "input");
  const sj_value* outputs = member(cfg, "output");
  if (inputs == NULL || inputs->type != SJ_ARRAY || inputs->n != 1 || outputs == NULL ||
      outputs->type != SJ_ARRAY || outputs->n != 1) {
    return errorf(SF_ERROR_INVALID_ARG,
                  "setsuna_forest: %s: the config must have exactly one input '" INPUT_NAME
                  "' and one output '" OUTPUT_NAME "'; republish the model",
                  m->name);
  }
  const sj_value* in = inputs->items[0];
  const sj_value* out = outputs->items[0];
  const char* in_name = string_of(member(in, "name"));
  const char* out_name = string_of(member(out, "name"));
  const char* in_type = string_of(member(in, "data_type"));
  const char* out_type = string_of(member(out, "data_type"));
  const sj_value* in_dims = member(in, "dims");
  const sj_value* out_dims = member(out, "dims");
  long long f = -1, one = -1;
  if (in_name == NULL || strcmp(in_name, INPUT_NAME) != 0 || out_name == NULL ||
      strcmp(out_name, OUTPUT_NAME) != 0 || in_type == NULL ||
      strcmp(in_type, "TYPE_FP32") != 0 || out_type == NULL ||
      strcmp(out_type, "TYPE_FP32") != 0 || in_dims == NULL || in_dims->type != SJ_ARRAY ||
      in_dims->n != 1 || int_of(in_dims->items[0], &f) != 0 || out_dims == NULL ||
      out_dims->type != SJ_ARRAY || out_dims->n != 1 ||
      int_of(out_dims->items[0], &one) != 0 || f != m->manifest.n_features || one != 1) {
    return errorf(SF_ERROR_INVALID_ARG,
                  "setsuna_forest: %s: the config must take '" INPUT_NAME
                  "' TYPE_FP32 dims [%d] and give '" OUTPUT_NAME
                  "' TYPE_FP32 dims [1], as the manifest's schema says; republish the model",
                  m->name, m->manifest.n_features);
  }
  m->margin_ns = DEFAULT_MARGIN_US * 1e3;
  const char* margin = string_of(member(member(member(cfg, "parameters"), "shed_margin_us"),
                                        "string_value"));
  if (margin != NULL && margin[0] != '\0') {
    char* end = NULL;
    double us = strtod(margin, &end);
    if (end == margin || *end != '\0' || !(us >= 0 && us <= 60e6)) {
      return errorf(SF_ERROR_INVALID_ARG,
                    "setsuna_forest: %s: config parameter shed_margin_us='%s': give "
                    "0..60000000 microseconds",
                    m->name, margin);
    }
    m->margin_ns = us * 1e3;
  }
  return NULL;
}

static TRITONSERVER_Error* read_config(TRITONBACKEND_Model* model, model_state* m) {
  TRITONSERVER_Message* message = NULL;
  TRITONSERVER_Error* err = TRITONBACKEND_ModelConfig(model, 1, &message);
  if (err != NULL) return err;
  const char* text = NULL;
  size_t len = 0;
  err = TRITONSERVER_MessageSerializeToJson(message, &text, &len);
  if (err == NULL) {
    char why[SF_ERR] = "";
    sj_value* cfg = sj_parse(text, len, why, sizeof why);
    if (cfg == NULL) {
      err = errorf(SF_ERROR_INTERNAL, "setsuna_forest: %s: cannot read the model config: %s",
                   m->name, why);
    } else {
      err = check_config(m, cfg);
      sj_free(cfg);
    }
  }
  TRITONSERVER_Error* del = TRITONSERVER_MessageDelete(message);
  if (del != NULL) TRITONSERVER_ErrorDelete(del);
  return err;
}

static void free_model(model_state* m) {
  if (m == NULL) return;
  sf_engine_close(&m->engine);
  sf_manifest_release(&m->manifest);
  /* Metrics before their families: a family must outlive its metrics. */
  TRITONSERVER_Metric* metrics[3] = {m->shed_metric, m->failure_engine, m->failure_refused};
  for (int i = 0; i < 3; ++i) {
    if (metrics[i] == NULL) continue;
    TRITONSERVER_Error* e = TRITONSERVER_MetricDelete(metrics[i]);
    if (e != NULL) TRITONSERVER_ErrorDelete(e);
  }
  TRITONSERVER_MetricFamily* families[2] = {m->shed_family, m->failure_family};
  for (int i = 0; i < 2; ++i) {
    if (families[i] == NULL) continue;
    TRITONSERVER_Error* e = TRITONSERVER_MetricFamilyDelete(families[i]);
    if (e != NULL) TRITONSERVER_ErrorDelete(e);
  }
  free(m);
}

static TRITONSERVER_Error* make_failure_metric(model_state* m, const char* reason,
                                               TRITONSERVER_Metric** out) {
  TRITONSERVER_Parameter* model = TRITONSERVER_ParameterNew("model", SF_PARAMETER_STRING, m->name);
  TRITONSERVER_Parameter* why = TRITONSERVER_ParameterNew("reason", SF_PARAMETER_STRING, reason);
  const TRITONSERVER_Parameter* labels[2] = {model, why};
  TRITONSERVER_Error* err = TRITONSERVER_MetricNew(out, m->failure_family, labels, 2);
  TRITONSERVER_ParameterDelete(why);
  TRITONSERVER_ParameterDelete(model);
  return err;
}

static TRITONSERVER_Error* make_metric(model_state* m) {
  TRITONSERVER_Error* err = TRITONSERVER_MetricFamilyNew(&m->shed_family, SF_METRIC_COUNTER,
                                                         SHED_FAMILY, SHED_DESCRIPTION);
  if (err != NULL) return err;
  TRITONSERVER_Parameter* label = TRITONSERVER_ParameterNew("model", SF_PARAMETER_STRING, m->name);
  const TRITONSERVER_Parameter* labels[1] = {label};
  err = TRITONSERVER_MetricNew(&m->shed_metric, m->shed_family, labels, 1);
  TRITONSERVER_ParameterDelete(label);
  if (err == NULL) {
    err = TRITONSERVER_MetricFamilyNew(&m->failure_family, SF_METRIC_COUNTER, FAILURE_FAMILY,
                                       FAILURE_DESCRIPTION);
  }
  if (err == NULL) err = make_failure_metric(m, "engine", &m->failure_engine);
  if (err == NULL) err = make_failure_metric(m, "refused", &m->failure_refused);
  return err;
}

static void count(TRITONSERVER_Metric* metric, uint32_t n) {
  if (n == 0 || metric == NULL) return;
  TRITONSERVER_Error* e = TRITONSERVER_MetricIncrement(metric, (double)n);
  if (e != NULL) TRITONSERVER_ErrorDelete(e);
}

EXPORT TRITONSERVER_Error* TRITONBACKEND_ModelInitialize(TRITONBACKEND_Model* model) {
  const char* name = NULL;
  const char* location = NULL;
  int artifact = -1;
  uint64_t version = 0;
  TRITONSERVER_Error* err = TRITONBACKEND_ModelName(model, &name);
  if (err == NULL) err = TRITONBACKEND_ModelVersion(model, &version);
  if (err == NULL) err = TRITONBACKEND_ModelRepository(model, &artifact, &location);
  if (err != NULL) return err;
  if (artifact != SF_ARTIFACT_FILESYSTEM) {
    return errorf(SF_ERROR_UNSUPPORTED,
                  "setsuna_forest: %s: only models in a filesystem repository can be verified",
                  name);
  }
  model_state* m = calloc(1, sizeof *m);
  if (m == NULL) return errorf(SF_ERROR_INTERNAL, "setsuna_forest: %s: out of memory", name);
  snprintf(m->name, sizeof m->name, "%s", name);
  m->version = version;
  char dir[4096];
  char why[SF_ERR] = "";
  if ((size_t)snprintf(dir, sizeof dir, "%s/%llu", location, (unsigned long long)version) >=
      sizeof dir) {
    free(m);
    return errorf(SF_ERROR_INVALID_ARG, "setsuna_forest: %s: repository path too long", name);
  }
  /* The reason Triton shows for a model that will not load is this message. */
  if (sf_verify_version(dir, NULL, &m->manifest, why, sizeof why) != 0) {
    free(m);
    return errorf(SF_ERROR_INVALID_ARG, "setsuna_forest: %s version %llu refused: %s", name,
                  (unsigned long long)version, why);
  }
  err = read_config(model, m);
  if (err == NULL && sf_engine_open(&m->engine, &m->manifest, why, sizeof why) != 0) {
    err = errorf(SF_ERROR_INVALID_ARG, "setsuna_forest: %s version %llu refused: %s", name,
                 (unsigned long long)version, why);
  }
  if (err == NULL) err = make_metric(m);
  if (err == NULL) err = TRITONBACKEND_ModelSetState(model, m);
  if (err != NULL) {
    free_model(m);
    return err;
  }
  log_msg(SF_LOG_INFO,
          "setsuna_forest: %s version %llu verified (sealed by key %s) and loaded: engine %s, "
          "%d features, NaN %s",
          name, (unsigned long long)version, m->manifest.signer_key_id, m->manifest.engine,
          m->manifest.n_features, m->manifest.allow_nan ? "allowed" : "refused");
  return NULL;
}

EXPORT TRITONSERVER_Error* TRITONBACKEND_ModelFinalize(TRITONBACKEND_Model* model) {
  void* state = NULL;
  TRITONSERVER_Error* err = TRITONBACKEND_ModelState(model, &state);
  if (err != NULL) return err;
  free_model((model_state*)state);
  return NULL;
}

/* ----------------------------------------------------------------- instance */

EXPORT TRITONSERVER_Error* TRITONBACKEND_ModelInstanceInitialize(
    TRITONBACKEND_ModelInstance* instance) {
  TRITONBACKEND_Model* model = NULL;
  void* mstate = NULL;
  int kind = -1;
  TRITONSERVER_Error* err = TRITONBACKEND_ModelInstanceModel(instance, &model);
  if (err == NULL) err = TRITONBACKEND_ModelState(model, &mstate);
  if (err == NULL) err = TRITONBACKEND_ModelInstanceKind(instance, &kind);
  if (err != NULL) return err;
  model_state* m = (model_state*)mstate;
  if (kind != SF_KIND_CPU) {
    return errorf(SF_ERROR_INVALID_ARG,
                  "setsuna_forest: %s: instance kind %d is not KIND_CPU; the compiled forests "
                  "run on the CPU: set instance_group { kind: KIND_CPU }",
                  m->name, kind);
  }
  instance_state* s = calloc(1, sizeof *s);
  if (s == NULL) return errorf(SF_ERROR_INTERNAL, "setsuna_forest: %s: out of memory", m->name);
  s->model = m;
  s->batch_ns = INITIAL_BATCH_US * 1e3;
  return TRITONBACKEND_ModelInstanceSetState(instance, s);
}

static void free_instance(instance_state* s) {
  if (s == NULL) return;
  sf_scratch_free(&s->scratch);
  free(s->x);
  free(s->y);
  free(s->responses);
  free(s->inputs);
  free(s->rows);
  free(s->buffers);
  free(s->status);
  free(s->success);
  free(s);
}

EXPORT TRITONSERVER_Error* TRITONBACKEND_ModelInstanceFinalize(
    TRITONBACKEND_ModelInstance* instance) {
  void* state = NULL;
  TRITONSERVER_Error* err = TRITONBACKEND_ModelInstanceState(instance, &state);
  if (err != NULL) return err;
  free_instance((instance_state*)state);
  return NULL;
}

/* ------------------------------------------------------------------ execute */

/* realloc *p to n elements of size each; *p is kept (and -1 returned) on failure. */
static int grow_array(void* p, size_t n, size_t size) {
  void* next = realloc(*(void**)p, n * size);
  if (next == NULL) return -1;
  *(void**)p = next;
  return 0;
}

static int reserve_requests(instance_state* s, uint32_t n) {
  if (n <= s->cap_requests) return 0;
  if (grow_array(&s->responses, n, sizeof *s->responses) != 0 ||
      grow_array(&s->inputs, n, sizeof *s->inputs) != 0 ||
      grow_array(&s->rows, n, sizeof *s->rows) != 0 ||
      grow_array(&s->buffers, n, sizeof *s->buffers) != 0 ||
      grow_array(&s->status, n, sizeof *s->status) != 0 ||
      grow_array(&s->success, n, sizeof *s->success) != 0) {
    return -1; /* the arrays that grew stay valid; capacity is still the old one */
  }
  s->cap_requests = n;
  return 0;
}

static int reserve_rows(instance_state* s, int64_t rows, int n_features) {
  if ((size_t)rows <= s->cap_rows) return 0;
  float* x = malloc(sizeof(float) * (size_t)rows * (size_t)n_features);
  float* y = malloc(sizeof(float) * (size_t)rows);
  if (x == NULL || y == NULL) {
    free(x);
    free(y);
    return -1;
  }
  free(s->x);
  free(s->y);
  s->x = x;
  s->y = y;
  s->cap_rows = (size_t)rows;
  return 0;
}

static void send(TRITONBACKEND_Response* response, TRITONSERVER_Error* error) {
  TRITONSERVER_Error* e = TRITONBACKEND_ResponseSend(response, SF_RESPONSE_COMPLETE_FINAL, error);
  if (error != NULL) TRITONSERVER_ErrorDelete(error);
  if (e != NULL) {
    log_msg(SF_LOG_ERROR, "setsuna_forest: sending a response failed: %s",
            TRITONSERVER_ErrorMessage(e));
    TRITONSERVER_ErrorDelete(e);
  }
}

/* The caller's deadline (setsuna.deadline), or 0 when the request carries none. */
static int64_t deadline_of(TRITONBACKEND_Request* request) {
  uint32_t count = 0;
  TRITONSERVER_Error* err = TRITONBACKEND_RequestParameterCount(request, &count);
  if (err != NULL) {
    TRITONSERVER_ErrorDelete(err);
    return 0;
  }
  for (uint32_t i = 0; i < count; ++i) {
    const char* key = NULL;
    int type = -1;
    const void* value = NULL;
    err = TRITONBACKEND_RequestParameter(request, i, &key, &type, &value);
    if (err != NULL) {
      TRITONSERVER_ErrorDelete(err);
      continue;
    }
    if (key != NULL && strcmp(key, DEADLINE_PARAMETER) == 0 && type == SF_PARAMETER_INT) {
      return *(const int64_t*)value;
    }
  }
  return 0;
}

static void shape_text(const int64_t* shape, uint32_t dims, char* out, size_t cap) {
  size_t at = (size_t)snprintf(out, cap, "[");
  for (uint32_t d = 0; d < dims && at < cap; ++d) {
    at += (size_t)snprintf(out + at, cap - at, "%s%lld", d ? ", " : "", (long long)shape[d]);
  }
  if (at < cap) snprintf(out + at, cap - at, "]");
}

/* Check one request's input; on success rows/buffers are filled. NULL or the refusal. */
static TRITONSERVER_Error* check_request(instance_state* s, TRITONBACKEND_Request* request,
                                         uint32_t r) {
  model_state* m = s->model;
  const int f = m->manifest.n_features;
  TRITONBACKEND_Input* input = NULL;
  TRITONSERVER_Error* err = TRITONBACKEND_RequestInput(request, INPUT_NAME, &input);
  if (err != NULL) {
    TRITONSERVER_ErrorDelete(err);
    return errorf(SF_ERROR_INVALID_ARG,
                  "%s: the request has no input '" INPUT_NAME "'; send one FP32 tensor of "
                  "shape [n, %d]",
                  m->name, f);
  }
  int datatype = -1;
  const int64_t* shape = NULL;
  uint32_t dims = 0, buffers = 0;
  uint64_t bytes = 0;
  err = TRITONBACKEND_InputProperties(input, NULL, &datatype, &shape, &dims, &bytes, &buffers);
  if (err != NULL) return err;
  if (datatype != SF_TYPE_FP32) {
    return errorf(SF_ERROR_INVALID_ARG,
                  "%s: input '" INPUT_NAME "' has data type %d, not FP32; send float32 features",
                  m->name, datatype);
  }
  char text[256];
  shape_text(shape, dims, text, sizeof text);
  if (dims != 2 || shape[1] != f || shape[0] < 1 ||
      (uint64_t)shape[0] > UINT64_MAX / 4 / (uint64_t)f ||
      bytes != (uint64_t)shape[0] * (uint64_t)f * sizeof(float)) {
    return errorf(SF_ERROR_INVALID_ARG,
                  "%s: input '" INPUT_NAME "' has shape %s but this model takes [n, %d] "
                  "(%d features: %s%s)",
                  m->name, text, f, f, m->manifest.feature_names[0], f > 1 ? ", ..." : "");
  }
  for (uint32_t b = 0; b < buffers; ++b) {
    const void* base = NULL;
    uint64_t size = 0;
    int memory = SF_MEMORY_CPU;
    int64_t memory_id = 0;
    err = TRITONBACKEND_InputBuffer(input, b, &base, &size, &memory, &memory_id);
    if (err != NULL) return err;
    if (memory != SF_MEMORY_CPU && memory != SF_MEMORY_CPU_PINNED) {
      return errorf(SF_ERROR_INVALID_ARG,
                    "%s: input '" INPUT_NAME "' is in GPU memory; setsuna_forest runs on the "
                    "CPU: send it from host memory",
                    m->name);
    }
  }
  s->inputs[r] = input;
  s->rows[r] = shape[0];
  s->buffers[r] = buffers;
  return NULL;
}

/* The NaN policy on one request's rows, contiguous (Triton may split an input into
   buffers at any byte, so the scan runs after the gather, never per buffer). */
static TRITONSERVER_Error* check_finite(const model_state* m, const float* x, int64_t rows) {
  const int f = m->manifest.n_features;
  const int64_t n = rows * f;
  for (int64_t i = 0; i < n; ++i) {
    if (!isfinite(x[i])) {
      return errorf(SF_ERROR_INVALID_ARG,
                    "%s: input '" INPUT_NAME "': non-finite value %g at row %lld, column %lld "
                    "(%s): this model was built without allow_nan; clean or impute the features "
                    "before inference",
                    m->name, (double)x[i], (long long)(i / f), (long long)(i % f),
                    m->manifest.feature_names[i % f]);
    }
  }
  return NULL;
}

/* Copy request r's rows (all its buffers) to dst. */
static void gather(instance_state* s, uint32_t r, float* dst) {
  char* at = (char*)dst;
  for (uint32_t b = 0; b < s->buffers[r]; ++b) {
    const void* base = NULL;
    uint64_t size = 0;
    int memory = SF_MEMORY_CPU;
    int64_t memory_id = 0;
    TRITONSERVER_Error* err = TRITONBACKEND_InputBuffer(s->inputs[r], b, &base, &size, &memory,
                                                        &memory_id);
    if (err != NULL) { /* checked moments ago in check_request; cannot fail now */
      TRITONSERVER_ErrorDelete(err);
      continue;
    }
    memcpy(at, base, size);
    at += size;
  }
}

static float* output_buffer(TRITONBACKEND_Response* response, int64_t rows,
                            TRITONSERVER_Error** err) {
  TRITONBACKEND_Output* output = NULL;
  int64_t shape[2] = {rows, 1};
  *err = TRITONBACKEND_ResponseOutput(response, &output, OUTPUT_NAME, SF_TYPE_FP32, shape, 2);
  if (*err != NULL) return NULL;
  void* buffer = NULL;
  int memory = SF_MEMORY_CPU;
  int64_t memory_id = 0;
  *err = TRITONBACKEND_OutputBuffer(output, &buffer, (uint64_t)rows * sizeof(float), &memory,
                                    &memory_id);
  if (*err != NULL) return NULL;
  if (memory != SF_MEMORY_CPU && memory != SF_MEMORY_CPU_PINNED) {
    *err = TRITONSERVER_ErrorNew(SF_ERROR_INTERNAL,
                                 "setsuna_forest: Triton gave a non-host output buffer");
    return NULL;
  }
  return (float*)buffer;
}

EXPORT TRITONSERVER_Error* TRITONBACKEND_ModelInstanceExecute(
    TRITONBACKEND_ModelInstance* instance, TRITONBACKEND_Request** requests,
    const uint32_t n_requests) {
  const uint64_t exec_start = now_ns(CLOCK_MONOTONIC);
  void* state = NULL;
  TRITONSERVER_Error* err = TRITONBACKEND_ModelInstanceState(instance, &state);
  if (err != NULL) return err; /* Triton then fails and releases every request */
  instance_state* s = (instance_state*)state;
  model_state* m = s->model;
  const int f = m->manifest.n_features;
  if (reserve_requests(s, n_requests) != 0) {
    return errorf(SF_ERROR_INTERNAL, "setsuna_forest: %s: out of memory for a batch of %u",
                  m->name, n_requests);
  }
  const uint64_t wall = now_ns(CLOCK_REALTIME);
  uint32_t good = 0, only = 0, shed = 0, refused = 0, failed = 0;
  int64_t total = 0;
  for (uint32_t r = 0; r < n_requests; ++r) {
    s->status[r] = REQ_DONE;
    s->success[r] = 0;
    s->responses[r] = NULL;
    err = TRITONBACKEND_ResponseNew(&s->responses[r], requests[r]);
    if (err != NULL) { /* nothing can be sent for it; it is released below */
      log_msg(SF_LOG_ERROR, "setsuna_forest: %s: no response for a request: %s", m->name,
              TRITONSERVER_ErrorMessage(err));
      TRITONSERVER_ErrorDelete(err);
      s->responses[r] = NULL;
      continue;
    }
    int64_t due = deadline_of(requests[r]);
    if (due != 0 && (double)due - (double)wall < s->batch_ns + m->margin_ns) {
      ++shed;
      send(s->responses[r],
           errorf(SF_ERROR_UNAVAILABLE,
                  SHED_MARK ": %s: the caller's deadline is %.0f us away and a batch takes ~%.0f "
                            "us here; not computed. The server is overloaded: retry later, slow "
                            "down or add instances",
                  m->name, ((double)due - (double)wall) / 1e3, s->batch_ns / 1e3));
      continue;
    }
    err = check_request(s, requests[r], r);
    if (err != NULL) {
      ++refused;
      send(s->responses[r], err);
      continue;
    }
    s->status[r] = REQ_GOOD;
    total += s->rows[r];
    only = r;
    ++good;
  }
  if (shed > 0 && m->shed_metric != NULL) {
    TRITONSERVER_Error* e = TRITONSERVER_MetricIncrement(m->shed_metric, (double)shed);
    if (e != NULL) TRITONSERVER_ErrorDelete(e);
  }
  uint64_t compute_start = now_ns(CLOCK_MONOTONIC), compute_end = compute_start;
  const float* x = NULL;
  float* y = NULL;
  TRITONSERVER_Error* fail = NULL;
  const int direct = good == 1 && s->buffers[only] == 1;
  if (direct) { /* one request, one buffer: Triton's buffers in and out, no copy */
    const void* base = NULL;
    uint64_t size = 0;
    int memory = SF_MEMORY_CPU;
    int64_t memory_id = 0;
    fail = TRITONBACKEND_InputBuffer(s->inputs[only], 0, &base, &size, &memory, &memory_id);
    x = (const float*)base;
    if (fail == NULL && !m->manifest.allow_nan) {
      TRITONSERVER_Error* refusal = check_finite(m, x, s->rows[only]);
      if (refusal != NULL) {
        ++refused;
        send(s->responses[only], refusal);
        s->status[only] = REQ_DONE;
        good = 0;
      }
    }
    if (fail == NULL && good == 1) y = output_buffer(s->responses[only], total, &fail);
  } else if (good > 0 && reserve_rows(s, total, f) != 0) {
    fail = errorf(SF_ERROR_INTERNAL, "%s: out of memory for a %lld-row batch", m->name,
                  (long long)total);
  } else if (good > 0) {
    /* Gather the good requests' rows; a request refused by the NaN check is
       dropped by writing the next one over it. */
    int64_t at = 0;
    for (uint32_t r = 0; r < n_requests; ++r) {
      if (s->status[r] != REQ_GOOD) continue;
      gather(s, r, s->x + at * f);
      TRITONSERVER_Error* refusal =
          m->manifest.allow_nan ? NULL : check_finite(m, s->x + at * f, s->rows[r]);
      if (refusal != NULL) {
        ++refused;
        send(s->responses[r], refusal);
        s->status[r] = REQ_DONE;
        --good;
        continue;
      }
      at += s->rows[r];
    }
    total = at;
    x = s->x;
    y = s->y;
  }
  if (good > 0) {
    char why[SF_ERR] = "";
    compute_start = now_ns(CLOCK_MONOTONIC);
    if (fail == NULL && sf_engine_run(&m->engine, &s->scratch, x, total, y, why, sizeof why) != 0) {
      fail = errorf(SF_ERROR_INTERNAL, "%s: engine failed: %s", m->name, why);
    }
    compute_end = now_ns(CLOCK_MONOTONIC);
    if (fail == NULL) s->batch_ns += EWMA_WEIGHT * ((double)(compute_end - compute_start) - s->batch_ns);
    int64_t at = 0;
    for (uint32_t r = 0; r < n_requests; ++r) {
      if (s->status[r] != REQ_GOOD) continue;
      TRITONSERVER_Error* mine = NULL;
      if (fail != NULL) {
        ++failed;
        mine = TRITONSERVER_ErrorNew(SF_ERROR_INTERNAL, TRITONSERVER_ErrorMessage(fail));
      } else if (!direct) {
        float* out = output_buffer(s->responses[r], s->rows[r], &mine);
        if (out != NULL) memcpy(out, y + at, (size_t)s->rows[r] * sizeof(float));
      }
      at += s->rows[r];
      s->success[r] = mine == NULL;
      send(s->responses[r], mine);
    }
    if (fail != NULL) TRITONSERVER_ErrorDelete(fail);
  }
  count(m->failure_engine, failed);
  count(m->failure_refused, refused);
  const uint64_t exec_end = now_ns(CLOCK_MONOTONIC);
  int64_t served_rows = 0;
  for (uint32_t r = 0; r < n_requests; ++r) {
    if (s->success[r]) served_rows += s->rows[r];
    TRITONSERVER_Error* e = TRITONBACKEND_ModelInstanceReportStatistics(
        instance, requests[r], s->success[r], exec_start, compute_start, compute_end, exec_end);
    if (e != NULL) TRITONSERVER_ErrorDelete(e);
    e = TRITONBACKEND_RequestRelease(requests[r], SF_REQUEST_RELEASE_ALL);
    if (e != NULL) {
      log_msg(SF_LOG_ERROR, "setsuna_forest: %s: releasing a request failed: %s", m->name,
              TRITONSERVER_ErrorMessage(e));
      TRITONSERVER_ErrorDelete(e);
    }
  }
  if (served_rows > 0) {
    TRITONSERVER_Error* e = TRITONBACKEND_ModelInstanceReportBatchStatistics(
        instance, (uint64_t)served_rows, exec_start, compute_start, compute_end, exec_end);
    if (e != NULL) TRITONSERVER_ErrorDelete(e);
  }
  return NULL;
}
