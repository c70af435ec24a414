/* setsuna_forest: the project's own declarations of the Triton C API it uses.

   Written from Triton's public headers (core: include/triton/core/
   tritonbackend.h and tritonserver.h, TRITONBACKEND API 1.19, the version the
   pytriton 0.7.0 server reports), not copied: only the handful of opaque
   types, enum values and functions the backend calls. TRITONBACKEND_Initialize
   checks the server's API version against SF_API_MAJOR/SF_API_MINOR at load,
   so a server whose ABI this file does not describe refuses the backend with
   a message instead of calling into it. Enum values are fixed by the C ABI
   (declaration order in the public header). Tests hold both to the real
   server: tests/setsuna/test_native_forest.py checks that the wheel's
   libtritonserver exports every function declared here, and the served tests
   observe each value used (FP32 requests served; INVALID_ARGUMENT,
   UNAVAILABLE and INTERNAL statuses; the shed counter). */
#ifndef SETSUNA_FOREST_TRITON_API_H
#define SETSUNA_FOREST_TRITON_API_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define SF_API_MAJOR 1
/* The newest function used here (RequestParameter*) is older than 1.19; 1.19
   is the version these declarations were checked against. */
#define SF_API_MINOR 19

typedef struct TRITONSERVER_Error TRITONSERVER_Error;
typedef struct TRITONSERVER_Message TRITONSERVER_Message;
typedef struct TRITONSERVER_MetricFamily TRITONSERVER_MetricFamily;
typedef struct TRITONSERVER_Metric TRITONSERVER_Metric;
typedef struct TRITONSERVER_Parameter TRITONSERVER_Parameter;
typedef struct TRITONBACKEND_Backend TRITONBACKEND_Backend;
typedef struct TRITONBACKEND_Model TRITONBACKEND_Model;
typedef struct TRITONBACKEND_ModelInstance TRITONBACKEND_ModelInstance;
typedef struct TRITONBACKEND_Request TRITONBACKEND_Request;
typedef struct TRITONBACKEND_Response TRITONBACKEND_Response;
typedef struct TRITONBACKEND_Input TRITONBACKEND_Input;
typedef struct TRITONBACKEND_Output TRITONBACKEND_Output;

/* TRITONSERVER_DataType */
enum { SF_TYPE_FP32 = 11 };
/* TRITONSERVER_MemoryType */
enum { SF_MEMORY_CPU = 0, SF_MEMORY_CPU_PINNED = 1 };
/* TRITONSERVER_Error_Code */
enum {
  SF_ERROR_UNKNOWN = 0,
  SF_ERROR_INTERNAL = 1,
  SF_ERROR_NOT_FOUND = 2,
  SF_ERROR_INVALID_ARG = 3,
  SF_ERROR_UNAVAILABLE = 4,
  SF_ERROR_UNSUPPORTED = 5
};
/* TRITONSERVER_ParameterType */
enum { SF_PARAMETER_STRING = 0, SF_PARAMETER_INT = 1, SF_PARAMETER_BOOL = 2 };
/* TRITONSERVER_InstanceGroupKind */
enum { SF_KIND_AUTO = 0, SF_KIND_CPU = 1, SF_KIND_GPU = 2, SF_KIND_MODEL = 3 };
/* TRITONSERVER_LogLevel */
enum { SF_LOG_INFO = 0, SF_LOG_WARN = 1, SF_LOG_ERROR = 2, SF_LOG_VERBOSE = 3 };
/* TRITONSERVER_MetricKind */
enum { SF_METRIC_COUNTER = 0 };
/* TRITONBACKEND_ArtifactType */
enum { SF_ARTIFACT_FILESYSTEM = 0 };
/* TRITONSERVER_RequestReleaseFlag / TRITONSERVER_ResponseCompleteFlag */
enum { SF_REQUEST_RELEASE_ALL = 1, SF_RESPONSE_COMPLETE_FINAL = 1 };

/* tritonserver.h */
extern TRITONSERVER_Error* TRITONSERVER_ErrorNew(int code, const char* msg);
extern void TRITONSERVER_ErrorDelete(TRITONSERVER_Error* error);
extern const char* TRITONSERVER_ErrorMessage(TRITONSERVER_Error* error);
extern TRITONSERVER_Error* TRITONSERVER_LogMessage(int level, const char* file, int line,
                                                   const char* msg);
extern TRITONSERVER_Error* TRITONSERVER_MessageSerializeToJson(TRITONSERVER_Message* message,
                                                               const char** base,
                                                               size_t* byte_size);
extern TRITONSERVER_Error* TRITONSERVER_MessageDelete(TRITONSERVER_Message* message);
extern TRITONSERVER_Parameter* TRITONSERVER_ParameterNew(const char* name, int type,
                                                         const void* value);
extern void TRITONSERVER_ParameterDelete(TRITONSERVER_Parameter* parameter);
extern TRITONSERVER_Error* TRITONSERVER_MetricFamilyNew(TRITONSERVER_MetricFamily** family,
                                                        int kind, const char* name,
                                                        const char* description);
extern TRITONSERVER_Error* TRITONSERVER_MetricFamilyDelete(TRITONSERVER_MetricFamily* family);
extern TRITONSERVER_Error* TRITONSERVER_MetricNew(TRITONSERVER_Metric** metric,
                                                  TRITONSERVER_MetricFamily* family,
                                                  const TRITONSERVER_Parameter** labels,
                                                  uint64_t label_count);
extern TRITONSERVER_Error* TRITONSERVER_MetricDelete(TRITONSERVER_Metric* metric);
extern TRITONSERVER_Error* TRITONSERVER_MetricIncrement(TRITONSERVER_Metric* metric,
                                                        double value);

/* tritonbackend.h */
extern TRITONSERVER_Error* TRITONBACKEND_ApiVersion(uint32_t* major, uint32_t* minor);
extern TRITONSERVER_Error* TRITONBACKEND_ModelName(TRITONBACKEND_Model* model,
                                                   const char** name);
extern TRITONSERVER_Error* TRITONBACKEND_ModelVersion(TRITONBACKEND_Model* model,
                                                      uint64_t* version);
extern TRITONSERVER_Error* TRITONBACKEND_ModelRepository(TRITONBACKEND_Model* model,
                                                         int* artifact_type,
                                                         const char** location);
extern TRITONSERVER_Error* TRITONBACKEND_ModelConfig(TRITONBACKEND_Model* model,
                                                     uint32_t config_version,
                                                     TRITONSERVER_Message** model_config);
extern TRITONSERVER_Error* TRITONBACKEND_ModelState(TRITONBACKEND_Model* model, void** state);
extern TRITONSERVER_Error* TRITONBACKEND_ModelSetState(TRITONBACKEND_Model* model, void* state);
extern TRITONSERVER_Error* TRITONBACKEND_ModelInstanceName(TRITONBACKEND_ModelInstance* instance,
                                                           const char** name);
extern TRITONSERVER_Error* TRITONBACKEND_ModelInstanceKind(TRITONBACKEND_ModelInstance* instance,
                                                           int* kind);
extern TRITONSERVER_Error* TRITONBACKEND_ModelInstanceModel(TRITONBACKEND_ModelInstance* instance,
                                                            TRITONBACKEND_Model** model);
extern TRITONSERVER_Error* TRITONBACKEND_ModelInstanceState(TRITONBACKEND_ModelInstance* instance,
                                                            void** state);
extern TRITONSERVER_Error* TRITONBACKEND_ModelInstanceSetState(
    TRITONBACKEND_ModelInstance* instance, void* state);
extern TRITONSERVER_Error* TRITONBACKEND_ModelInstanceReportStatistics(
    TRITONBACKEND_ModelInstance* instance, TRITONBACKEND_Request* request, bool success,
    uint64_t exec_start_ns, uint64_t compute_start_ns, uint64_t compute_end_ns,
    uint64_t exec_end_ns);
extern TRITONSERVER_Error* TRITONBACKEND_ModelInstanceReportBatchStatistics(
    TRITONBACKEND_ModelInstance* instance, uint64_t batch_size, uint64_t exec_start_ns,
    uint64_t compute_start_ns, uint64_t compute_end_ns, uint64_t exec_end_ns);
extern TRITONSERVER_Error* TRITONBACKEND_RequestInput(TRITONBACKEND_Request* request,
                                                      const char* name,
                                                      TRITONBACKEND_Input** input);
extern TRITONSERVER_Error* TRITONBACKEND_RequestParameterCount(TRITONBACKEND_Request* request,
                                                               uint32_t* count);
extern TRITONSERVER_Error* TRITONBACKEND_RequestParameter(TRITONBACKEND_Request* request,
                                                          uint32_t index, const char** key,
                                                          int* type, const void** vvalue);
extern TRITONSERVER_Error* TRITONBACKEND_InputProperties(TRITONBACKEND_Input* input,
                                                         const char** name, int* datatype,
                                                         const int64_t** shape,
                                                         uint32_t* dims_count,
                                                         uint64_t* byte_size,
                                                         uint32_t* buffer_count);
extern TRITONSERVER_Error* TRITONBACKEND_InputBuffer(TRITONBACKEND_Input* input, uint32_t index,
                                                     const void** buffer, uint64_t* byte_size,
                                                     int* memory_type, int64_t* memory_type_id);
extern TRITONSERVER_Error* TRITONBACKEND_ResponseNew(TRITONBACKEND_Response** response,
                                                     TRITONBACKEND_Request* request);
extern TRITONSERVER_Error* TRITONBACKEND_ResponseDelete(TRITONBACKEND_Response* response);
extern TRITONSERVER_Error* TRITONBACKEND_ResponseOutput(TRITONBACKEND_Response* response,
                                                        TRITONBACKEND_Output** output,
                                                        const char* name, int datatype,
                                                        const int64_t* shape,
                                                        uint32_t dims_count);
extern TRITONSERVER_Error* TRITONBACKEND_OutputBuffer(TRITONBACKEND_Output* output,
                                                      void** buffer, uint64_t buffer_byte_size,
                                                      int* memory_type, int64_t* memory_type_id);
extern TRITONSERVER_Error* TRITONBACKEND_ResponseSend(TRITONBACKEND_Response* response,
                                                      uint32_t send_flags,
                                                      TRITONSERVER_Error* error);
extern TRITONSERVER_Error* TRITONBACKEND_RequestRelease(TRITONBACKEND_Request* request,
                                                        uint32_t release_flags);

#endif
