/* Strict JSON reader and Python-compatible canonical writer; see json.h for why strict. */
#include "json.h"

#include <stdarg.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct parser {
  const unsigned char *start, *p, *end;
  char *err;
  size_t err_len;
  int failed;
} parser;

static void fail(parser *ps, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void fail(parser *ps, const char *fmt, ...) {
  if (ps->failed) return; /* keep the first, innermost message */
  ps->failed = 1;
  if (!ps->err || ps->err_len == 0) return;
  int used = snprintf(ps->err, ps->err_len, "at byte %zu: ", (size_t)(ps->p - ps->start));
  if (used < 0 || (size_t)used >= ps->err_len) return;
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(ps->err + used, ps->err_len - (size_t)used, fmt, ap);
  va_end(ap);
}

static void skip_ws(parser *ps) {
  while (ps->p < ps->end && (*ps->p == ' ' || *ps->p == '\t' || *ps->p == '\n' || *ps->p == '\r'))
    ps->p++;
}

static sj_value *new_value(parser *ps, sj_type type) {
  sj_value *v = calloc(1, sizeof *v);
  if (!v) fail(ps, "out of memory");
  else v->type = type;
  return v;
}

void sj_free(sj_value *v) {
  if (!v) return;
  free(v->str);
  for (size_t k = 0; v->items && k < v->n; k++) sj_free(v->items[k]);
  free(v->items);
  for (size_t k = 0; v->members && k < v->n; k++) {
    free(v->members[k].key);
    sj_free(v->members[k].value);
  }
  free(v->members);
  free(v);
}

/* ------------------------------------------------------------------ strings */

static int hex4(const unsigned char *s, unsigned *out) {
  unsigned v = 0;
  for (int k = 0; k < 4; k++) {
    unsigned c = s[k], d;
    if (c >= '0' && c <= '9') d = c - '0';
    else if (c >= 'a' && c <= 'f') d = c - 'a' + 10;
    else if (c >= 'A' && c <= 'F') d = c - 'A' + 10;
    else return -1;
    v = v << 4 | d;
  }
  *out = v;
  return 0;
}

static size_t put_utf8(unsigned cp, char *out) {
  if (cp < 0x80) { out[0] = (char)cp; return 1; }
  if (cp < 0x800) {
    out[0] = (char)(0xC0 | cp >> 6);
    out[1] = (char)(0x80 | (cp & 0x3F));
    return 2;
  }
  if (cp < 0x10000) {
    out[0] = (char)(0xE0 | cp >> 12);
    out[1] = (char)(0x80 | (cp >> 6 & 0x3F));
    out[2] = (char)(0x80 | (cp & 0x3F));
    return 3;
  }
  out[0] = (char)(0xF0 | cp >> 18);
  out[1] = (char)(0x80 | (cp >> 12 & 0x3F));
  out[2] = (char)(0x80 | (cp >> 6 & 0x3F));
  out[3] = (char)(0x80 | (cp & 0x3F));
  return 4;
}

/* Length of the well-formed UTF-8 sequence at s (no overlongs, surrogates or > U+10FFFF), 0 if
   ill-formed; *cp gets its code point. */
static size_t utf8_seq(const unsigned char *s, const unsigned char *end, unsigned *cp) {
  unsigned c = s[0];
  size_t n;
  unsigned min;
  if (c < 0x80) { *cp = c; return 1; }
  if (c >= 0xC2 && c <= 0xDF) { n = 2; min = 0x80; *cp = c & 0x1F; }
  else if (c >= 0xE0 && c <= 0xEF) { n = 3; min = 0x800; *cp = c & 0x0F; }
  else if (c >= 0xF0 && c <= 0xF4) { n = 4; min = 0x10000; *cp = c & 0x07; }
  else return 0;
  if ((size_t)(end - s) < n) return 0;
  for (size_t k = 1; k < n; k++) {
    if ((s[k] & 0xC0) != 0x80) return 0;
    *cp = *cp << 6 | (s[k] & 0x3F);
  }
  if (*cp < min || *cp > 0x10FFFF || (*cp >= 0xD800 && *cp <= 0xDFFF)) return 0;
  return n;
}

/* Parse the string at ps->p (on its opening quote) into a malloc'd, NUL-terminated buffer. */
static char *parse_string(parser *ps, size_t *len_out) {
  const unsigned char *q = ps->p + 1;
  /* First find the closing quote: the decoded text is never longer than the raw one. */
  while (q < ps->end && *q != '"') q += (*q == '\\' && q + 1 < ps->end) ? 2 : 1;
  if (q >= ps->end) { fail(ps, "unterminated string"); return NULL; }
  char *out = malloc((size_t)(q - ps->p));
  if (!out) { fail(ps, "out of memory"); return NULL; }
  size_t n = 0;
  ps->p++;
  while (ps->p < q) {
    unsigned c = *ps->p, cp;
    if (c < 0x20) { fail(ps, "control character in a string"); goto bad; }
    if (c != '\\') {
      size_t k = utf8_seq(ps->p, q, &cp);
      if (!k) { fail(ps, "invalid UTF-8 in a string"); goto bad; }
      memcpy(out + n, ps->p, k);
      n += k;
      ps->p += k;
      continue;
    }
    unsigned e = ps->p[1];
    ps->p += 2;
    switch (e) {
      case '"': out[n++] = '"'; continue;
      case '\\': out[n++] = '\\'; continue;
      case '/': out[n++] = '/'; continue;
      case 'b': out[n++] = '\b'; continue;
      case 'f': out[n++] = '\f'; continue;
      case 'n': out[n++] = '\n'; continue;
      case 'r': out[n++] = '\r'; continue;
      case 't': out[n++] = '\t'; continue;
      case 'u': break;
      default: ps->p -= 2; fail(ps, "invalid escape in a string"); goto bad;
    }
    if (q - ps->p < 4 || hex4(ps->p, &cp)) { fail(ps, "invalid \\u escape"); goto bad; }
    ps->p += 4;
    if (cp >= 0xDC00 && cp <= 0xDFFF) { fail(ps, "lone low surrogate"); goto bad; }
    if (cp >= 0xD800 && cp <= 0xDBFF) {
      unsigned lo;
      if (q - ps->p < 6 || ps->p[0] != '\\' || ps->p[1] != 'u' || hex4(ps->p + 2, &lo) ||
          lo < 0xDC00 || lo > 0xDFFF) {
        fail(ps, "lone high surrogate");
        goto bad;
      }
      ps->p += 6;
      cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
    }
    n += put_utf8(cp, out + n);
  }
  ps->p = q + 1;
  out[n] = '\0';
  *len_out = n;
  return out;
bad:
  free(out);
  return NULL;
}

/* ------------------------------------------------------------------ values */

static sj_value *parse_value(parser *ps, int depth);

static sj_value *parse_number(parser *ps) {
  const unsigned char *s = ps->p, *q = s;
  int is_int = 1;
  if (q < ps->end && *q == '-') q++;
  if (q < ps->end && *q == '0') q++;
  else if (q < ps->end && *q >= '1' && *q <= '9') while (q < ps->end && *q >= '0' && *q <= '9') q++;
  else { fail(ps, "invalid number"); return NULL; }
  if (q < ps->end && *q == '.') {
    is_int = 0;
    if (++q >= ps->end || *q < '0' || *q > '9') { fail(ps, "invalid number"); return NULL; }
    while (q < ps->end && *q >= '0' && *q <= '9') q++;
  }
  if (q < ps->end && (*q == 'e' || *q == 'E')) {
    is_int = 0;
    q++;
    if (q < ps->end && (*q == '+' || *q == '-')) q++;
    if (q >= ps->end || *q < '0' || *q > '9') { fail(ps, "invalid number"); return NULL; }
    while (q < ps->end && *q >= '0' && *q <= '9') q++;
  }
  sj_value *v = new_value(ps, SJ_NUMBER);
  if (!v) return NULL;
  v->len = (size_t)(q - s);
  v->str = malloc(v->len + 1);
  if (!v->str) { fail(ps, "out of memory"); sj_free(v); return NULL; }
  memcpy(v->str, s, v->len);
  v->str[v->len] = '\0';
  if (is_int) {
    /* Digits accumulate as a negative number so LLONG_MIN fits; overflow makes it a non-int. */
    long long acc = 0;
    const unsigned char *d = s + (*s == '-');
    for (; d < q; d++) {
      int digit = *d - '0';
      if (acc < (LLONG_MIN + digit) / 10) { is_int = 0; break; }
      acc = acc * 10 - digit;
    }
    if (is_int && *s != '-' && acc == LLONG_MIN) is_int = 0;
    if (is_int) v->i = *s == '-' ? acc : -acc;
  }
  v->is_int = is_int;
  ps->p = q;
  return v;
}

static int grow(void **buf, size_t *cap, size_t need, size_t elem) {
  if (need <= *cap) return 0;
  size_t ncap = *cap ? *cap * 2 : 8;
  while (ncap < need) ncap *= 2;
  if (ncap > SIZE_MAX / elem) return -1;
  void *nb = realloc(*buf, ncap * elem);
  if (!nb) return -1;
  *buf = nb;
  *cap = ncap;
  return 0;
}

static sj_value *parse_array(parser *ps, int depth) {
  sj_value *v = new_value(ps, SJ_ARRAY);
  size_t cap = 0;
  if (!v) return NULL;
  ps->p++;
  skip_ws(ps);
  if (ps->p < ps->end && *ps->p == ']') { ps->p++; return v; }
  for (;;) {
    sj_value *item = parse_value(ps, depth + 1);
    if (!item) goto bad;
    if (grow((void **)&v->items, &cap, v->n + 1, sizeof *v->items)) {
      sj_free(item);
      fail(ps, "out of memory");
      goto bad;
    }
    v->items[v->n++] = item;
    skip_ws(ps);
    if (ps->p < ps->end && *ps->p == ',') { ps->p++; continue; }
    if (ps->p < ps->end && *ps->p == ']') { ps->p++; return v; }
    fail(ps, "expected ',' or ']' in an array");
    goto bad;
  }
bad:
  sj_free(v);
  return NULL;
}

static int key_cmp(const char *a, size_t alen, const char *b, size_t blen) {
  int c = memcmp(a, b, alen < blen ? alen : blen);
  if (c) return c;
  return alen < blen ? -1 : alen > blen;
}

/* UTF-8 byte order is code-point order, which is how Python sorts str keys. */
static int member_cmp(const void *a, const void *b) {
  const sj_member *x = *(const sj_member *const *)a, *y = *(const sj_member *const *)b;
  return key_cmp(x->key, x->key_len, y->key, y->key_len);
}

/* Members sorted by key (pointers into obj); NULL on allocation failure. */
static const sj_member **sorted_members(const sj_value *obj) {
  const sj_member **idx = malloc((obj->n ? obj->n : 1) * sizeof *idx);
  if (!idx) return NULL;
  for (size_t k = 0; k < obj->n; k++) idx[k] = &obj->members[k];
  qsort(idx, obj->n, sizeof *idx, member_cmp);
  return idx;
}

static int check_duplicates(parser *ps, const sj_value *obj) {
  if (obj->n < 2) return 0;
  const sj_member **idx = sorted_members(obj);
  if (!idx) { fail(ps, "out of memory"); return -1; }
  int dup = 0;
  for (size_t k = 1; k < obj->n && !dup; k++) dup = member_cmp(&idx[k - 1], &idx[k]) == 0;
  free(idx);
  if (dup) fail(ps, "duplicate key in an object");
  return dup ? -1 : 0;
}

static sj_value *parse_object(parser *ps, int depth) {
  sj_value *v = new_value(ps, SJ_OBJECT);
  size_t cap = 0;
  if (!v) return NULL;
  ps->p++;
  skip_ws(ps);
  if (ps->p < ps->end && *ps->p == '}') { ps->p++; return v; }
  for (;;) {
    skip_ws(ps);
    if (ps->p >= ps->end || *ps->p != '"') { fail(ps, "expected a string key"); goto bad; }
    size_t klen = 0;
    char *key = parse_string(ps, &klen);
    if (!key) goto bad;
    skip_ws(ps);
    if (ps->p >= ps->end || *ps->p != ':') { free(key); fail(ps, "expected ':'"); goto bad; }
    ps->p++;
    sj_value *item = parse_value(ps, depth + 1);
    if (!item) { free(key); goto bad; }
    if (grow((void **)&v->members, &cap, v->n + 1, sizeof *v->members)) {
      free(key);
      sj_free(item);
      fail(ps, "out of memory");
      goto bad;
    }
    v->members[v->n++] = (sj_member){key, klen, item};
    skip_ws(ps);
    if (ps->p < ps->end && *ps->p == ',') { ps->p++; continue; }
    if (ps->p < ps->end && *ps->p == '}') {
      ps->p++;
      if (check_duplicates(ps, v)) goto bad;
      return v;
    }
    fail(ps, "expected ',' or '}' in an object");
    goto bad;
  }
bad:
  sj_free(v);
  return NULL;
}

static int literal(parser *ps, const char *word) {
  size_t n = strlen(word);
  if ((size_t)(ps->end - ps->p) < n || memcmp(ps->p, word, n) != 0) return 0;
  ps->p += n;
  return 1;
}

static sj_value *parse_value(parser *ps, int depth) {
  if (depth > SJ_MAX_DEPTH) { fail(ps, "nested deeper than %d levels", SJ_MAX_DEPTH); return NULL; }
  skip_ws(ps);
  if (ps->p >= ps->end) { fail(ps, "unexpected end of input"); return NULL; }
  switch (*ps->p) {
    case '{': return parse_object(ps, depth);
    case '[': return parse_array(ps, depth);
    case '"': {
      size_t len = 0;
      char *s = parse_string(ps, &len);
      if (!s) return NULL;
      sj_value *v = new_value(ps, SJ_STRING);
      if (!v) { free(s); return NULL; }
      v->str = s;
      v->len = len;
      return v;
    }
    case 't': if (literal(ps, "true")) return new_value(ps, SJ_TRUE); break;
    case 'f': if (literal(ps, "false")) return new_value(ps, SJ_FALSE); break;
    case 'n': if (literal(ps, "null")) return new_value(ps, SJ_NULL); break;
    default:
      if (*ps->p == '-' || (*ps->p >= '0' && *ps->p <= '9')) return parse_number(ps);
  }
  fail(ps, "unexpected character");
  return NULL;
}

sj_value *sj_parse(const char *text, size_t len, char *err, size_t err_len) {
  parser ps = {(const unsigned char *)text, (const unsigned char *)text,
               (const unsigned char *)text + len, err, err_len, 0};
  if (err && err_len) err[0] = '\0';
  sj_value *v = parse_value(&ps, 1);
  if (!v) {
    fail(&ps, "invalid JSON"); /* only if nothing more precise was said */
    return NULL;
  }
  skip_ws(&ps);
  if (ps.p != ps.end) {
    fail(&ps, "trailing data after the JSON value");
    sj_free(v);
    return NULL;
  }
  return v;
}

const sj_value *sj_get(const sj_value *obj, const char *key) {
  if (!obj || obj->type != SJ_OBJECT) return NULL;
  size_t klen = strlen(key);
  for (size_t k = 0; k < obj->n; k++)
    if (key_cmp(obj->members[k].key, obj->members[k].key_len, key, klen) == 0)
      return obj->members[k].value;
  return NULL;
}

const char *sj_get_str(const sj_value *obj, const char *key) {
  const sj_value *v = sj_get(obj, key);
  return v && v->type == SJ_STRING ? v->str : NULL;
}

/* ------------------------------------------------------------------ canonical writer */

typedef struct buf {
  char *data;
  size_t len, cap;
  int oom;
} buf;

static void put(buf *b, const char *s, size_t n) {
  if (b->oom) return;
  if (n > SIZE_MAX - b->len - 1 || grow((void **)&b->data, &b->cap, b->len + n + 1, 1)) {
    b->oom = 1;
    return;
  }
  memcpy(b->data + b->len, s, n);
  b->len += n;
  b->data[b->len] = '\0';
}

static void put_u_escape(buf *b, unsigned unit) {
  static const char digits[] = "0123456789abcdef"; /* lowercase, as Python writes it */
  char tmp[6] = {'\\', 'u', digits[unit >> 12 & 0xF], digits[unit >> 8 & 0xF],
                 digits[unit >> 4 & 0xF], digits[unit & 0xF]};
  put(b, tmp, sizeof tmp);
}

/* Python's json encode_basestring_ascii: printable ASCII as is, everything else escaped. */
static void put_string(buf *b, const char *s, size_t len) {
  const unsigned char *p = (const unsigned char *)s, *end = p + len;
  put(b, "\"", 1);
  while (p < end) {
    unsigned c = *p, cp;
    if (c >= ' ' && c <= '~' && c != '"' && c != '\\') { put(b, (const char *)p, 1); p++; continue; }
    switch (c) {
      case '"': put(b, "\\\"", 2); p++; continue;
      case '\\': put(b, "\\\\", 2); p++; continue;
      case '\n': put(b, "\\n", 2); p++; continue;
      case '\r': put(b, "\\r", 2); p++; continue;
      case '\t': put(b, "\\t", 2); p++; continue;
      case '\b': put(b, "\\b", 2); p++; continue;
      case '\f': put(b, "\\f", 2); p++; continue;
      default: break;
    }
    size_t k = utf8_seq(p, end, &cp); /* the parser only stores well-formed UTF-8 */
    if (!k) { k = 1; cp = 0xFFFD; }
    p += k;
    if (cp >= 0x10000) {
      cp -= 0x10000;
      put_u_escape(b, 0xD800 | (cp >> 10));
      put_u_escape(b, 0xDC00 | (cp & 0x3FF));
    } else {
      put_u_escape(b, cp);
    }
  }
  put(b, "\"", 1);
}

static int dump(const sj_value *v, buf *b, char *err, size_t err_len) {
  switch (v->type) {
    case SJ_NULL: put(b, "null", 4); return 0;
    case SJ_TRUE: put(b, "true", 4); return 0;
    case SJ_FALSE: put(b, "false", 5); return 0;
    case SJ_NUMBER:
      snprintf(err, err_len, "a number (%.32s) where only strings are expected", v->str);
      return -1;
    case SJ_STRING: put_string(b, v->str, v->len); return 0;
    case SJ_ARRAY:
      put(b, "[", 1);
      for (size_t k = 0; k < v->n; k++) {
        if (k) put(b, ",", 1);
        if (dump(v->items[k], b, err, err_len)) return -1;
      }
      put(b, "]", 1);
      return 0;
    case SJ_OBJECT: {
      const sj_member **idx = sorted_members(v);
      if (!idx) { b->oom = 1; return 0; }
      put(b, "{", 1);
      for (size_t k = 0; k < v->n; k++) {
        if (k) put(b, ",", 1);
        put_string(b, idx[k]->key, idx[k]->key_len);
        put(b, ":", 1);
        if (dump(idx[k]->value, b, err, err_len)) { free(idx); return -1; }
      }
      put(b, "}", 1);
      free(idx);
      return 0;
    }
  }
  snprintf(err, err_len, "unknown JSON value");
  return -1;
}

int sj_dump_canonical(const sj_value *v, char **out, size_t *out_len, char *err, size_t err_len) {
  buf b = {0};
  if (err && err_len) err[0] = '\0';
  if (dump(v, &b, err, err_len) || b.oom) {
    if (b.oom) snprintf(err, err_len, "out of memory");
    free(b.data);
    return -1;
  }
  if (!b.data) put(&b, "", 0);
  if (b.oom) { snprintf(err, err_len, "out of memory"); return -1; }
  *out = b.data;
  *out_len = b.len;
  return 0;
}
