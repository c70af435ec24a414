/* SHA-256 and Ed25519 verification through OpenSSL 3's libcrypto, resolved at run time.
 *
 * No OpenSSL headers or link-time dependency: the serving hosts may lack the headers, and inside
 * tritonserver the server binary already has a libcrypto.so.3 in the global namespace (which is
 * used first, so one process never carries two copies). Otherwise libcrypto.so.3 is dlopen()ed
 * with RTLD_LOCAL. All symbols come from one library: never a mix of two.
 */
#ifndef SETSUNA_FOREST_CRYPTO_H
#define SETSUNA_FOREST_CRYPTO_H
#include <stddef.h>

/* 0, or -1 with err filled when libcrypto cannot be found or lacks a function. Thread-safe;
   the lookup happens once. The other functions call it themselves. */
int sc_init(char *err, size_t err_len);

/* sha256 of data[0..len): 0, or -1 with err filled. */
int sc_sha256(const void *data, size_t len, unsigned char out[32], char *err, size_t err_len);

/* 1: sig is pub's valid Ed25519 signature of msg; 0: it is not (or sig is not 64 bytes);
   -1: libcrypto failed (err filled). */
int sc_ed25519_verify(const unsigned char pub[32], const unsigned char *sig, size_t sig_len,
                      const unsigned char *msg, size_t msg_len, char *err, size_t err_len);

/* Decode base64 like Python's base64.b64decode(s, validate=True): the standard alphabet only,
   length a multiple of 4, '=' padding only at the end (at most two). Writes at most cap bytes.
   Returns the decoded length, or -1 when s is not valid base64 or does not fit. */
long sc_base64_decode(const char *s, size_t len, unsigned char *out, size_t cap);

/* Lowercase hex of in[0..n) into out (2n + 1 bytes, NUL-terminated). */
void sc_hex(const unsigned char *in, size_t n, char *out);

#endif
