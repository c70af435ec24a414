/* A small strict JSON reader (RFC 8259) for the files a model version folder holds.
 *
 * Strict because what it reads is attacker-reachable (a folder anyone with write access can
 * edit) and because a seal's signature is checked over a canonical re-serialisation: two readers
 * that disagree on a document (duplicate keys, NaN, invalid UTF-8, lone surrogates) would let a
 * file mean one thing to the verifier and another to the loader. So everything Python's
 * json.loads tolerates beyond the RFC is refused, as are duplicate keys. Nesting is limited
 * (SJ_MAX_DEPTH) so a hostile file cannot exhaust the stack.
 */
#ifndef SETSUNA_FOREST_JSON_H
#define SETSUNA_FOREST_JSON_H
#include <stddef.h>

#define SJ_MAX_DEPTH 64

typedef enum sj_type { SJ_NULL, SJ_FALSE, SJ_TRUE, SJ_NUMBER, SJ_STRING, SJ_ARRAY, SJ_OBJECT } sj_type;

typedef struct sj_value sj_value;
typedef struct sj_member {
  char *key;     /* decoded UTF-8, NUL-terminated (may also hold NULs: compare with key_len) */
  size_t key_len;
  sj_value *value;
} sj_member;

struct sj_value {
  sj_type type;
  char *str;       /* SJ_STRING: decoded UTF-8, NUL-terminated; SJ_NUMBER: its text */
  size_t len;      /* bytes in str */
  int is_int;      /* SJ_NUMBER: no fraction or exponent, and it fits a long long */
  long long i;     /* SJ_NUMBER with is_int */
  size_t n;        /* SJ_ARRAY: items; SJ_OBJECT: members */
  sj_value **items;
  sj_member *members; /* in document order */
};

/* Parse exactly one JSON value (surrounding whitespace allowed) from text[0..len). Returns NULL
   with a message naming the byte offset in err on any error. Free with sj_free. */
sj_value *sj_parse(const char *text, size_t len, char *err, size_t err_len);
void sj_free(sj_value *v);

/* The member of an object named key (a C string), or NULL (also when obj is not an object). */
const sj_value *sj_get(const sj_value *obj, const char *key);
/* The string value of obj[key], or NULL when absent or not a string. */
const char *sj_get_str(const sj_value *obj, const char *key);

/* Serialise v as Python's json.dumps(v, sort_keys=True, separators=(",", ":")) with
   ensure_ascii=True would. Numbers are refused (a seal payload never holds any, and Python's
   float repr is not worth reproducing). Returns a malloc'd buffer (*out, *out_len) or -1 with
   err filled. */
int sj_dump_canonical(const sj_value *v, char **out, size_t *out_len, char *err, size_t err_len);

#endif
