/* Load-time verification of a sealed model version folder for the setsuna_forest backend.
 *
 * Mirrors setsuna.seal.verify_version and setsuna.manifest.verify (the Python wrappers' checks),
 * then checks what this backend needs from the manifest. Every file is read once; the bytes that
 * were hashed are the bytes that are parsed (manifest.json) or loaded (the engine libraries, handed
 * over as memfds), so nothing can be swapped between the check and the use.
 */
#ifndef SETSUNA_FOREST_VERIFY_H
#define SETSUNA_FOREST_VERIFY_H
#include <stddef.h>
#define SF_ENGINE_TL2CGEN 1
#define SF_ENGINE_LLEAVES 2
typedef struct sf_engine_spec {
  int kind;                      /* SF_ENGINE_TL2CGEN or SF_ENGINE_LLEAVES; 0 = unused slot */
  char lib[256];                 /* params "lib": a plain file name inside the version folder */
  int lib_fd;                    /* memfd_create()d fd holding exactly the bytes that were hashed and matched; -1 if unused */
  int n_features;                /* lleaves: params "n_features"; tl2cgen: -1 (the library reports it) */
} sf_engine_spec;
typedef struct sf_manifest {
  char model[256];
  char engine[32];               /* "tl2cgen", "lleaves" or "switch" */
  int n_features;                /* schema.row_shape[0]; row_shape must have exactly one dim */
  int allow_nan;                 /* schema.allow_nan */
  char **feature_names;          /* schema.names, n_features of them (for error messages) */
  int threshold_rows;            /* switch: params threshold_rows (>= 2); single engine: 0 */
  sf_engine_spec small;          /* the only engine, or the switch's "small" */
  sf_engine_spec large;          /* the switch's "large"; kind 0 otherwise */
  char signer_key_id[17];        /* seal key_id */
} sf_manifest;
/* Verify version_dir (".../<model>/<version>") and fill *out. Returns 0 on success; otherwise
   -1 with a one-line, actionable message in err (always NUL-terminated) and *out released.
   trusted_keys_path NULL means: $SETSUNA_TRUSTED_KEYS, else $XDG_CONFIG_HOME/setsuna/trusted_keys,
   else $HOME/.config/setsuna/trusted_keys (HOME unset: getpwuid). */
int sf_verify_version(const char *version_dir, const char *trusted_keys_path, sf_manifest *out,
                      char *err, size_t err_len);
void sf_manifest_release(sf_manifest *m);       /* closes fds, frees names; safe on a zeroed or released struct */
/* This host's CPU hash exactly like setsuna.runtime.trees.cpu_flags(); writes "" if unknown. */
void sf_cpu_flags(const char *cpuinfo_path, char out[17]);
/* For tests via ctypes: runs sf_verify_version and writes into out either
   "ok engine=<e> model=<m> n_features=<n> allow_nan=<0|1> threshold_rows=<t> small=<kind>:<lib>:<fd_ok 0|1> large=<kind>:<lib>:<fd_ok>"
   or "error: <message>". Returns the sf_verify_version result. */
int sf_verify_describe(const char *version_dir, const char *trusted_keys_path, char *out, size_t cap);
#endif
