/* libcrypto through dlsym, strict base64 and hex; see crypto.h. */
#include "crypto.h"

#include <dlfcn.h>
#include <stdio.h>
#include <string.h>

/* Our own prototypes: the EVP types are opaque, so void pointers suffice. */
typedef void *(*fn_md_ctx_new)(void);
typedef void (*fn_md_ctx_free)(void *ctx);
typedef const void *(*fn_sha256)(void);
typedef int (*fn_digest)(const void *data, size_t count, unsigned char *md, unsigned int *size,
                         const void *type, void *engine);
typedef void *(*fn_new_raw_public_key)(int type, void *engine, const unsigned char *pub,
                                       size_t len);
typedef int (*fn_digest_verify_init)(void *ctx, void **pctx, const void *type, void *engine,
                                     void *pkey);
typedef int (*fn_digest_verify)(void *ctx, const unsigned char *sig, size_t sig_len,
                                const unsigned char *tbs, size_t tbs_len);
typedef void (*fn_pkey_free)(void *pkey);
typedef void (*fn_err_clear_error)(void);

#define SC_EVP_PKEY_ED25519 1087 /* NID_ED25519 */

typedef struct api {
  fn_md_ctx_new md_ctx_new;
  fn_md_ctx_free md_ctx_free;
  fn_sha256 sha256;
  fn_digest digest;
  fn_new_raw_public_key new_raw_public_key;
  fn_digest_verify_init digest_verify_init;
  fn_digest_verify digest_verify;
  fn_pkey_free pkey_free;
  fn_err_clear_error err_clear_error; /* optional */
} api;

static api g_api;
static int g_ready; /* read and written with __atomic: set once g_api is complete */

/* Every required function from one handle, or the name of the first one missing. */
static const char *resolve_from(void *handle, api *a) {
  /* dlsym returns void *; converting to a function pointer goes through memcpy to stay
     within ISO C (no -Wpedantic complaint either way). */
#define SC_SYM(field, name)                       \
  do {                                            \
    void *p_ = dlsym(handle, name);               \
    if (!p_) return name;                         \
    memcpy(&a->field, &p_, sizeof p_);            \
  } while (0)
  SC_SYM(md_ctx_new, "EVP_MD_CTX_new");
  SC_SYM(md_ctx_free, "EVP_MD_CTX_free");
  SC_SYM(sha256, "EVP_sha256");
  SC_SYM(digest, "EVP_Digest");
  SC_SYM(new_raw_public_key, "EVP_PKEY_new_raw_public_key");
  SC_SYM(digest_verify_init, "EVP_DigestVerifyInit");
  SC_SYM(digest_verify, "EVP_DigestVerify");
  SC_SYM(pkey_free, "EVP_PKEY_free");
#undef SC_SYM
  void *p = dlsym(handle, "ERR_clear_error");
  if (p) memcpy(&a->err_clear_error, &p, sizeof p);
  return NULL;
}

int sc_init(char *err, size_t err_len) {
  if (__atomic_load_n(&g_ready, __ATOMIC_ACQUIRE)) return 0;
  /* Two threads may both resolve: the results are identical, and a second dlopen only bumps
     a reference count, so no lock is needed. */
  api a = {0};
  const char *missing = resolve_from(RTLD_DEFAULT, &a);
  if (missing) {
    memset(&a, 0, sizeof a);
    void *handle = dlopen("libcrypto.so.3", RTLD_NOW | RTLD_LOCAL);
    if (!handle) {
      const char *why = dlerror();
      snprintf(err, err_len,
               "cannot load libcrypto.so.3 (%s): install OpenSSL 3 (libssl3) on this host; "
               "setsuna_forest needs it to check model seals",
               why ? why : "not found");
      return -1;
    }
    missing = resolve_from(handle, &a);
    if (missing) {
      snprintf(err, err_len, "libcrypto.so.3 lacks %s: install OpenSSL 3 on this host", missing);
      return -1;
    }
  }
  g_api = a;
  __atomic_store_n(&g_ready, 1, __ATOMIC_RELEASE);
  return 0;
}

/* A failed verification leaves entries on OpenSSL's per-thread error queue; the server's
   own TLS code shares that queue, so leave it empty. */
static void clear_errors(void) {
  if (g_api.err_clear_error) g_api.err_clear_error();
}

int sc_sha256(const void *data, size_t len, unsigned char out[32], char *err, size_t err_len) {
  if (sc_init(err, err_len)) return -1;
  unsigned int n = 0;
  static const unsigned char empty[1];
  if (!g_api.digest(len ? data : empty, len, out, &n, g_api.sha256(), NULL) || n != 32) {
    clear_errors();
    snprintf(err, err_len, "libcrypto's EVP_Digest(sha256) failed");
    return -1;
  }
  return 0;
}

int sc_ed25519_verify(const unsigned char pub[32], const unsigned char *sig, size_t sig_len,
                      const unsigned char *msg, size_t msg_len, char *err, size_t err_len) {
  if (sc_init(err, err_len)) return -1;
  if (sig_len != 64) return 0;
  void *pkey = g_api.new_raw_public_key(SC_EVP_PKEY_ED25519, NULL, pub, 32);
  if (!pkey) {
    clear_errors();
    return 0; /* not a valid curve point: nothing it could have signed */
  }
  void *ctx = g_api.md_ctx_new();
  if (!ctx) {
    g_api.pkey_free(pkey);
    clear_errors();
    snprintf(err, err_len, "libcrypto's EVP_MD_CTX_new failed (out of memory)");
    return -1;
  }
  static const unsigned char empty[1];
  int rc = -1;
  if (g_api.digest_verify_init(ctx, NULL, NULL, NULL, pkey) != 1)
    snprintf(err, err_len, "libcrypto's EVP_DigestVerifyInit(Ed25519) failed");
  else
    rc = g_api.digest_verify(ctx, sig, sig_len, msg_len ? msg : empty, msg_len) == 1;
  g_api.md_ctx_free(ctx);
  g_api.pkey_free(pkey);
  clear_errors();
  return rc;
}

static int b64_value(unsigned char c) {
  if (c >= 'A' && c <= 'Z') return c - 'A';
  if (c >= 'a' && c <= 'z') return c - 'a' + 26;
  if (c >= '0' && c <= '9') return c - '0' + 52;
  if (c == '+') return 62;
  if (c == '/') return 63;
  return -1;
}

long sc_base64_decode(const char *s, size_t len, unsigned char *out, size_t cap) {
  if (len % 4) return -1;
  size_t pad = 0;
  while (pad < len && s[len - 1 - pad] == '=') pad++;
  if (pad > 2) return -1;
  size_t n_out = len / 4 * 3 - pad;
  if (n_out > cap || n_out > (size_t)0x7fffffff) return -1;
  size_t o = 0;
  for (size_t k = 0; k < len; k += 4) {
    unsigned acc = 0;
    int quad_pad = 0;
    for (size_t j = 0; j < 4; j++) {
      unsigned char c = (unsigned char)s[k + j];
      int v;
      if (c == '=' && k + j >= len - pad) { v = 0; quad_pad++; }
      else if ((v = b64_value(c)) < 0) return -1; /* includes '=' before the end */
      acc = acc << 6 | (unsigned)v;
    }
    unsigned char bytes[3] = {(unsigned char)(acc >> 16), (unsigned char)(acc >> 8),
                              (unsigned char)acc};
    for (int j = 0; j < 3 - quad_pad; j++) out[o++] = bytes[j];
  }
  return (long)o;
}

void sc_hex(const unsigned char *in, size_t n, char *out) {
  static const char digits[] = "0123456789abcdef";
  for (size_t k = 0; k < n; k++) {
    out[2 * k] = digits[in[k] >> 4];
    out[2 * k + 1] = digits[in[k] & 0xF];
  }
  out[2 * n] = '\0';
}
