/* Load-time verification of a sealed version folder; see verify.h.
 *
 * Order and messages follow setsuna.seal.verify_version then setsuna.manifest.verify, so the
 * native backend refuses exactly what the Python wrappers refuse (and a little more: symlinked
 * directories, numbers in a seal payload, JSON that Python would tolerate but the RFC does not).
 * The folder is attacker-reachable: every size, count and depth is bounded, and files are opened
 * relative to the directory fd that was walked, never following a symlink.
 */
#include "verify.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pwd.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "crypto.h"
#include "json.h"

#define SF_EXPORT __attribute__((visibility("default")))

#define SF_MAX_ENTRIES 10000                 /* files and directories in one version folder */
#define SF_MAX_FILE_BYTES ((size_t)1 << 30)  /* one file */
#define SF_MAX_KEPT_BYTES ((size_t)4 << 30)  /* top-level files kept in memory at once */
#define SF_MAX_JSON_BYTES ((size_t)16 << 20) /* seal.json, manifest.json, config.pbtxt */
#define SF_MAX_KEYS_BYTES ((size_t)1 << 20)  /* the trusted-keys file */
#define SF_MAX_KEYS 1024
#define SF_MAX_DIR_DEPTH 16
#define SF_MAX_FEATURES (1 << 20)
#define SF_SEAL "seal.json"
#define SF_MANIFEST "manifest.json"
#define SF_CONFIG "config.pbtxt"
#define SF_TL2CGEN_LIB "tl2cgen-forest.so"
#define SF_REPUBLISH "republish the model"
#define SF_REBUILD "rebuild the model (make build-engines) and republish it"

typedef struct trusted_key {
  char id[17];
  unsigned char raw[32];
} trusted_key;

typedef struct entry {
  char *name;          /* relative to the version folder, '/'-separated */
  char sha[65];
  unsigned char *data; /* the verified bytes of a top-level file; NULL for nested ones */
  size_t size;
} entry;

typedef struct vctx {
  char *err;
  size_t err_len;
  char dir[PATH_MAX];       /* the version folder, trailing '/' removed */
  char model_dir[PATH_MAX]; /* its lexical parent, as Python's Path.parent */
  const char *model_name, *version_name;
  char shown[600];          /* dir, printable, for messages */
  char keys_path[PATH_MAX];
  trusted_key *keys;
  size_t n_keys;
  const sj_member **sealed; /* the seal's files, sorted by name */
  size_t n_sealed;
  unsigned char *seen;      /* parallel to sealed */
  entry *files;             /* regular files found, in walk (= Python's sorted) order */
  size_t n_files, cap_files, n_entries, kept_bytes;
} vctx;

/* ------------------------------------------------------------------ messages */

static int fail(vctx *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int fail(vctx *c, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(c->err, c->err_len, fmt, ap);
  va_end(ap);
  return -1;
}

/* A name made printable on one line (a file name may hold a tab or a newline). */
static const char *show(const char *s, size_t len, char *buf, size_t cap) {
  size_t o = 0;
  for (size_t k = 0; k < len && o + 8 < cap; k++) {
    unsigned char ch = (unsigned char)s[k];
    if (ch == '\t') o += (size_t)snprintf(buf + o, cap - o, "\\t");
    else if (ch == '\n') o += (size_t)snprintf(buf + o, cap - o, "\\n");
    else if (ch == '\r') o += (size_t)snprintf(buf + o, cap - o, "\\r");
    else if (ch < 0x20 || ch == 0x7f) o += (size_t)snprintf(buf + o, cap - o, "\\x%02x", ch);
    else buf[o++] = (char)ch;
    if (k + 1 < len && o + 8 >= cap) {
      memcpy(buf + o, "...", 4);
      return buf;
    }
  }
  buf[o < cap ? o : cap - 1] = '\0';
  return buf;
}

#define SHOW(s, buf) show((s), strlen(s), (buf), sizeof(buf))

/* "['a', 'b']" like Python's list repr, as many names as fit. */
static void show_list(const char *const *names, size_t n, char *buf, size_t cap) {
  size_t o = (size_t)snprintf(buf, cap, "[");
  for (size_t k = 0; k < n && o < cap; k++) {
    char one[300];
    int w = snprintf(buf + o, cap - o, "%s'%s'", k ? ", " : "", SHOW(names[k], one));
    if (w < 0 || (size_t)w >= cap - o) {
      if (cap > 8) snprintf(buf + cap - 8, 8, "...]");
      return;
    }
    o += (size_t)w;
  }
  if (o < cap) snprintf(buf + o, cap - o, "]");
}

/* ------------------------------------------------------------------ files */

enum { READ_OK = 0, READ_ERRNO = -1, READ_NOT_REGULAR = -2, READ_TOO_BIG = -3 };

/* All bytes of the regular file open on fd (closed here), at most cap of them. */
static int read_fd(int fd, size_t cap, unsigned char **out, size_t *len) {
  struct stat st;
  *out = NULL;
  *len = 0;
  if (fstat(fd, &st)) { int e = errno; close(fd); errno = e; return READ_ERRNO; }
  if (!S_ISREG(st.st_mode)) { close(fd); return READ_NOT_REGULAR; }
  if (st.st_size < 0 || (uint64_t)st.st_size > cap) { close(fd); return READ_TOO_BIG; }
  /* st_size is a hint: a file that grows while being read is still capped. */
  size_t size = (size_t)st.st_size, have = 0, room = size + 1;
  unsigned char *data = malloc(room);
  if (!data) { close(fd); errno = ENOMEM; return READ_ERRNO; }
  for (;;) {
    if (have == room) {
      if (room > cap) { free(data); close(fd); return READ_TOO_BIG; }
      size_t nroom = room * 2 > cap + 1 ? cap + 1 : room * 2;
      unsigned char *nd = realloc(data, nroom);
      if (!nd) { free(data); close(fd); errno = ENOMEM; return READ_ERRNO; }
      data = nd;
      room = nroom;
    }
    ssize_t got = read(fd, data + have, room - have);
    if (got < 0 && errno == EINTR) continue;
    if (got < 0) { int e = errno; free(data); close(fd); errno = e; return READ_ERRNO; }
    if (got == 0) break;
    have += (size_t)got;
  }
  close(fd);
  if (have > cap) { free(data); return READ_TOO_BIG; }
  *out = data;
  *len = have;
  return READ_OK;
}

static int sha_hex(vctx *c, const void *data, size_t len, char hex[65]) {
  unsigned char md[32];
  char why[256];
  if (sc_sha256(data, len, md, why, sizeof why))
    return fail(c, "%s: cannot hash files: %s", c->shown, why);
  sc_hex(md, 32, hex);
  return 0;
}

/* ------------------------------------------------------------------ trusted keys */

static const char ws_chars[] = " \t\n\r\v\f\x1c\x1d\x1e\x1f"; /* Python's ASCII whitespace */

/* Python's str.strip()/split() whitespace and str.splitlines() breaks (ASCII ones). The ch
   test matters: strchr() finds the terminating NUL. */
static int is_ws(unsigned char ch) { return ch && strchr(ws_chars, ch) != NULL; }
static int is_line_break(unsigned char ch) { return ch && strchr("\n\r\v\f\x1c\x1d\x1e", ch) != NULL; }

/* v is a string equal to s, with no NUL inside it that would end a strcmp() early. */
static int same_str(const sj_value *v, const char *s) {
  return v && v->type == SJ_STRING && v->len == strlen(s) && memcmp(v->str, s, v->len) == 0;
}

static int default_keys_path(vctx *c) {
  const char *env = getenv("SETSUNA_TRUSTED_KEYS");
  const char *xdg = getenv("XDG_CONFIG_HOME");
  int w;
  if (env && *env) w = snprintf(c->keys_path, sizeof c->keys_path, "%s", env);
  else if (xdg && *xdg) w = snprintf(c->keys_path, sizeof c->keys_path, "%s/setsuna/trusted_keys", xdg);
  else {
    const char *home = getenv("HOME");
    struct passwd pw, *found = NULL;
    char pwbuf[4096];
    if ((!home || !*home) && getpwuid_r(geteuid(), &pw, pwbuf, sizeof pwbuf, &found) == 0 && found)
      home = found->pw_dir; /* getpwuid_r: the backend may verify on several threads at once */
    if (home && !*home) home = NULL;
    if (!home)
      return fail(c, "no trusted keys: HOME is unset and uid %u has no home; set "
                     "$SETSUNA_TRUSTED_KEYS to the publisher's public keys", (unsigned)geteuid());
    w = snprintf(c->keys_path, sizeof c->keys_path, "%s/.config/setsuna/trusted_keys", home);
  }
  if (w < 0 || (size_t)w >= sizeof c->keys_path)
    return fail(c, "the trusted-keys path is too long; set $SETSUNA_TRUSTED_KEYS to a shorter one");
  return 0;
}

static int parse_key_line(vctx *c, const char *line, size_t len, size_t lineno) {
  unsigned char raw[33], md[32];
  char why[256], p[600];
  if (sc_base64_decode(line, len, raw, sizeof raw) != 32)
    return fail(c, "%s:%zu: not a base64 Ed25519 public key (32 raw bytes); fix the line",
                SHOW(c->keys_path, p), lineno);
  if (c->n_keys >= SF_MAX_KEYS)
    return fail(c, "%s lists more than %d keys; remove old ones", SHOW(c->keys_path, p), SF_MAX_KEYS);
  trusted_key *k = &c->keys[c->n_keys++];
  memcpy(k->raw, raw, 32);
  if (sc_sha256(raw, 32, md, why, sizeof why)) return fail(c, "cannot hash a trusted key: %s", why);
  char hex[65];
  sc_hex(md, 32, hex);
  memcpy(k->id, hex, 16);
  k->id[16] = '\0';
  return 0;
}

static int load_keys(vctx *c, const char *path) {
  char p[600];
  if (path) {
    if (snprintf(c->keys_path, sizeof c->keys_path, "%s", path) >= (int)sizeof c->keys_path)
      return fail(c, "the trusted-keys path is too long");
  } else if (default_keys_path(c)) {
    return -1;
  }
  SHOW(c->keys_path, p);
  int fd = open(c->keys_path, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  struct stat st;
  if (fd < 0 || fstat(fd, &st) || !S_ISREG(st.st_mode)) {
    if (fd >= 0) close(fd);
    return fail(c, "no trusted keys at %s: publish a model first (the build creates a key and "
                   "trusts it) or set $SETSUNA_TRUSTED_KEYS to the publisher's public keys", p);
  }
  /* Whoever can write this file decides which models load (and so which code runs). */
  if (st.st_uid != geteuid() || (st.st_mode & 022)) {
    close(fd);
    return fail(c, "%s is owned by uid %u or writable by others (mode %o): whoever can write it "
                   "decides which models load; chmod go-w %s (and own it)",
                p, (unsigned)st.st_uid, (unsigned)(st.st_mode & 0777), p);
  }
  unsigned char *text;
  size_t len;
  int rc = read_fd(fd, SF_MAX_KEYS_BYTES, &text, &len);
  if (rc == READ_TOO_BIG) return fail(c, "%s is larger than 1 MiB: it should list a few keys", p);
  if (rc) return fail(c, "cannot read %s: %s", p, strerror(errno));
  c->keys = calloc(SF_MAX_KEYS, sizeof *c->keys);
  if (!c->keys) { free(text); return fail(c, "out of memory reading %s", p); }
  /* Lines as Python's str.splitlines() cuts them, stripped like str.strip(). */
  size_t lineno = 0, pos = 0;
  while (pos < len) {
    size_t end = pos;
    while (end < len && !is_line_break(text[end])) end++;
    lineno++;
    size_t a = pos, b = end;
    while (a < b && is_ws(text[a])) a++;
    while (b > a && is_ws(text[b - 1])) b--;
    if (b > a && text[a] != '#' && parse_key_line(c, (const char *)text + a, b - a, lineno)) {
      free(text);
      return -1;
    }
    pos = end + (end < len && text[end] == '\r' && end + 1 < len && text[end + 1] == '\n') + 1;
  }
  free(text);
  if (!c->n_keys) return fail(c, "%s lists no keys: add the publisher's public key", p);
  return 0;
}

/* ------------------------------------------------------------------ seal */

static int member_cmp(const void *a, const void *b) {
  const sj_member *x = *(const sj_member *const *)a, *y = *(const sj_member *const *)b;
  int r = memcmp(x->key, y->key, x->key_len < y->key_len ? x->key_len : y->key_len);
  return r ? r : (x->key_len > y->key_len) - (x->key_len < y->key_len);
}

/* The index of name in a sorted member array, or -1. */
static long find_member(const sj_member *const *v, size_t n, const char *name) {
  sj_member probe = {(char *)name, strlen(name), NULL};
  const sj_member *pp = &probe;
  const sj_member *const *hit = bsearch(&pp, v, n, sizeof *v, member_cmp);
  return hit ? (long)(hit - v) : -1;
}

/* Sorted pointers to obj's members, each a string (a {name: sha256} map); NULL on error. */
static const sj_member **string_map(const sj_value *obj) {
  const sj_member **v = malloc((obj->n ? obj->n : 1) * sizeof *v);
  if (!v) return NULL;
  for (size_t k = 0; k < obj->n; k++) {
    if (obj->members[k].value->type != SJ_STRING) { free(v); return NULL; }
    v[k] = &obj->members[k];
  }
  qsort(v, obj->n, sizeof *v, member_cmp);
  return v;
}

static int read_json_at(vctx *c, int dfd, const char *name, sj_value **out, int *missing) {
  char why[256];
  unsigned char *text;
  size_t len;
  *out = NULL;
  int fd = openat(dfd, name, O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOFOLLOW);
  if (fd < 0 && errno == ENOENT) { *missing = 1; return -1; }
  if (fd < 0)
    return fail(c, "%s/%s is unreadable (%s): %s", c->shown, name, strerror(errno), SF_REPUBLISH);
  int rc = read_fd(fd, SF_MAX_JSON_BYTES, &text, &len);
  if (rc == READ_NOT_REGULAR)
    return fail(c, "%s/%s is not a regular file: %s", c->shown, name, SF_REPUBLISH);
  if (rc == READ_TOO_BIG)
    return fail(c, "%s/%s is larger than 16 MiB: %s", c->shown, name, SF_REPUBLISH);
  if (rc) return fail(c, "%s/%s is unreadable (%s)", c->shown, name, strerror(errno));
  *out = sj_parse((const char *)text, len, why, sizeof why);
  free(text);
  if (!*out)
    return fail(c, "%s/%s is malformed (%s): %s", c->shown, name, why, SF_REPUBLISH);
  return 0;
}

static int check_signature(vctx *c, const sj_value *doc, const sj_value *payload, sf_manifest *out) {
  const sj_value *kid_v = sj_get(doc, "key_id");
  const char *kid = sj_get_str(doc, "key_id");
  const trusted_key *key = NULL;
  char p[600], why[256], shown_kid[64];
  for (size_t k = 0; kid && k < c->n_keys && !key; k++)
    if (same_str(kid_v, c->keys[k].id)) key = &c->keys[k];
  if (!key)
    return fail(c, "%s/%s: signed by key %s, which is not trusted (%s): republish it with a "
                   "trusted key", c->shown, SF_SEAL, kid && *kid ? SHOW(kid, shown_kid) : "?",
                SHOW(c->keys_path, p));
  memcpy(out->signer_key_id, key->id, sizeof out->signer_key_id);
  char *canon = NULL;
  size_t canon_len = 0;
  if (sj_dump_canonical(payload, &canon, &canon_len, why, sizeof why))
    return fail(c, "%s/%s is malformed: its payload holds %s; %s", c->shown, SF_SEAL, why,
                SF_REPUBLISH);
  const sj_value *sig = sj_get(doc, "signature");
  unsigned char raw[65];
  long n = sig && sig->type == SJ_STRING ? sc_base64_decode(sig->str, sig->len, raw, sizeof raw) : -1;
  int ok = n < 0 ? 0 : sc_ed25519_verify(key->raw, raw, (size_t)n, (unsigned char *)canon, canon_len, why, sizeof why);
  free(canon);
  if (ok < 0) return fail(c, "%s/%s: cannot check the signature: %s", c->shown, SF_SEAL, why);
  if (!ok)
    return fail(c, "%s/%s: the signature does not match its contents (edited or re-hashed after "
                   "publishing); do not serve it, %s", c->shown, SF_SEAL, SF_REPUBLISH);
  return 0;
}

static int check_config(vctx *c, const sj_value *sealed_sha) {
  char path[PATH_MAX + 16], p[700], hex[65];
  snprintf(path, sizeof path, "%s/%s", c->model_dir, SF_CONFIG);
  SHOW(path, p);
  unsigned char *data = NULL;
  size_t len = 0;
  int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  int rc = fd < 0 ? READ_ERRNO : read_fd(fd, SF_MAX_JSON_BYTES, &data, &len);
  int same = rc == READ_OK && sha_hex(c, data, len, hex) == 0 && same_str(sealed_sha, hex);
  free(data);
  if (!same)
    return fail(c, "%s differs from the sealed config (or is missing): configs are published "
                   "with their model; %s", p, SF_REPUBLISH);
  return 0;
}

static int check_seal(vctx *c, int vfd, sf_manifest *out, sj_value **doc_out) {
  int missing = 0;
  sj_value *doc;
  if (read_json_at(c, vfd, SF_SEAL, &doc, &missing)) {
    if (missing)
      return fail(c, "%s/%s is missing: this folder was not published by setsuna (or its seal "
                     "was removed); only sealed folders load. Publish it with the build",
                  c->shown, SF_SEAL);
    return -1;
  }
  *doc_out = doc;
  const sj_value *payload = sj_get(doc, "payload");
  if (!payload) return fail(c, "%s/%s is malformed: no payload; %s", c->shown, SF_SEAL, SF_REPUBLISH);
  if (check_signature(c, doc, payload, out)) return -1;
  /* Signed, so what follows was written by a trusted publisher: still checked, never trusted
     to be well-formed. */
  const char *model = sj_get_str(payload, "model"), *version = sj_get_str(payload, "version");
  if (!same_str(sj_get(payload, "model"), c->model_name) ||
      !same_str(sj_get(payload, "version"), c->version_name)) {
    char a[300], b[300], d[300], e[300];
    return fail(c, "%s/%s seals %s/%s, not %s/%s: a folder was copied or renamed; publish it "
                   "under its own name", c->shown, SF_SEAL, model ? SHOW(model, a) : "None",
                version ? SHOW(version, b) : "None", SHOW(c->model_name, d), SHOW(c->version_name, e));
  }
  const sj_value *config_sha = sj_get(payload, "config_sha256");
  if (check_config(c, config_sha && config_sha->type == SJ_STRING ? config_sha : NULL)) return -1;
  const sj_value *files = sj_get(payload, "files");
  if (!files || files->type != SJ_OBJECT || !(c->sealed = string_map(files)))
    return fail(c, "%s/%s is malformed: its files are not a {name: sha256} map; %s", c->shown,
                SF_SEAL, SF_REPUBLISH);
  c->n_sealed = files->n;
  c->seen = calloc(c->n_sealed ? c->n_sealed : 1, 1);
  if (!c->seen) return fail(c, "out of memory");
  return 0;
}

/* ------------------------------------------------------------------ the walk */

static int name_cmp(const void *a, const void *b) {
  return strcmp(*(const char *const *)a, *(const char *const *)b);
}

static int check_file(vctx *c, int dfd, const char *name, const char *rel, const struct stat *st,
                      int top) {
  char n[600];
  long idx = find_member(c->sealed, c->n_sealed, rel);
  if (idx < 0)
    return fail(c, "%s: %s is not in the seal (planted after publishing); remove it or %s",
                c->shown, SHOW(rel, n), SF_REPUBLISH);
  if (!S_ISREG(st->st_mode))
    return fail(c, "%s: %s is not a regular file (a symlink or special file): only published "
                   "files load; %s", c->shown, SHOW(rel, n), SF_REPUBLISH);
  int fd = openat(dfd, name, O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOFOLLOW);
  unsigned char *data = NULL;
  size_t len = 0;
  int rc = fd < 0 ? READ_ERRNO : read_fd(fd, SF_MAX_FILE_BYTES, &data, &len);
  if (rc == READ_NOT_REGULAR)
    return fail(c, "%s: %s is not a regular file: %s", c->shown, SHOW(rel, n), SF_REPUBLISH);
  if (rc == READ_TOO_BIG)
    return fail(c, "%s: %s is larger than the 1 GiB limit for a model file; %s", c->shown,
                SHOW(rel, n), SF_REBUILD);
  if (rc) return fail(c, "%s: cannot read %s (%s)", c->shown, SHOW(rel, n), strerror(errno));
  if (c->n_files == c->cap_files) {
    size_t ncap = c->cap_files ? c->cap_files * 2 : 16;
    entry *nf = realloc(c->files, ncap * sizeof *nf);
    if (!nf) { free(data); return fail(c, "out of memory"); }
    c->files = nf;
    c->cap_files = ncap;
  }
  entry *e = &c->files[c->n_files];
  memset(e, 0, sizeof *e);
  if (sha_hex(c, data, len, e->sha)) { free(data); return -1; }
  if (!same_str(c->sealed[idx]->value, e->sha)) {
    free(data);
    return fail(c, "%s: sha256 of %s does not match the seal; the file was modified after "
                   "publishing. Do not serve it: %s", c->shown, SHOW(rel, n), SF_REPUBLISH);
  }
  c->seen[idx] = 1;
  if (!(e->name = strdup(rel))) { free(data); return fail(c, "out of memory"); }
  /* Only top-level files can be the manifest or an engine library; keep their verified bytes. */
  if (top && c->kept_bytes + len <= SF_MAX_KEPT_BYTES) {
    e->data = data;
    e->size = len;
    c->kept_bytes += len;
  } else {
    free(data);
  }
  c->n_files++;
  return 0;
}

static int walk(vctx *c, int dfd, const char *prefix, int depth);

static int walk_entry(vctx *c, int dfd, const char *name, const char *prefix, int depth) {
  char rel[PATH_MAX], n[600];
  if (depth == 0 && strcmp(name, SF_SEAL) == 0) return 0; /* the seal does not seal itself */
  int w = prefix ? snprintf(rel, sizeof rel, "%s/%s", prefix, name) : snprintf(rel, sizeof rel, "%s", name);
  if (w < 0 || (size_t)w >= sizeof rel)
    return fail(c, "%s: a path under it is longer than %d bytes; %s", c->shown, PATH_MAX, SF_REBUILD);
  struct stat st;
  if (fstatat(dfd, name, &st, AT_SYMLINK_NOFOLLOW))
    return fail(c, "%s: cannot stat %s (%s)", c->shown, SHOW(rel, n), strerror(errno));
  if (!S_ISDIR(st.st_mode)) return check_file(c, dfd, name, rel, &st, depth == 0);
  if (depth + 1 > SF_MAX_DIR_DEPTH)
    return fail(c, "%s: %s is nested more than %d directories deep; %s", c->shown, SHOW(rel, n),
                SF_MAX_DIR_DEPTH, SF_REBUILD);
  int sub = openat(dfd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
  if (sub < 0) return fail(c, "%s: cannot open %s (%s)", c->shown, SHOW(rel, n), strerror(errno));
  return walk(c, sub, rel, depth + 1);
}

/* Every entry under dfd (which this closes), each directory's entries in byte order: that is
   Python's sorted(rglob("*")) order, so the first offending file named is the same. */
static int walk(vctx *c, int dfd, const char *prefix, int depth) {
  DIR *d = fdopendir(dfd);
  if (!d) { close(dfd); return fail(c, "%s: cannot list it (%s)", c->shown, strerror(errno)); }
  char **names = NULL;
  size_t n = 0, cap = 0;
  int rc = 0;
  struct dirent *de;
  errno = 0;
  while (!rc && (de = readdir(d))) {
    if (!strcmp(de->d_name, ".") || !strcmp(de->d_name, "..")) continue;
    if (++c->n_entries > SF_MAX_ENTRIES) {
      rc = fail(c, "%s holds more than %d files and folders; a model folder never does: %s",
                c->shown, SF_MAX_ENTRIES, SF_REBUILD);
      break;
    }
    if (n == cap) {
      size_t ncap = cap ? cap * 2 : 16;
      char **nn = realloc(names, ncap * sizeof *nn);
      if (!nn) { rc = fail(c, "out of memory"); break; }
      names = nn;
      cap = ncap;
    }
    if (!(names[n] = strdup(de->d_name))) { rc = fail(c, "out of memory"); break; }
    n++;
  }
  if (!rc && errno) rc = fail(c, "%s: cannot list it (%s)", c->shown, strerror(errno));
  if (!rc) qsort(names, n, sizeof *names, name_cmp);
  for (size_t k = 0; !rc && k < n; k++) rc = walk_entry(c, dirfd(d), names[k], prefix, depth);
  for (size_t k = 0; k < n; k++) free(names[k]);
  free(names);
  closedir(d);
  return rc;
}

static int check_missing(vctx *c) {
  const char *missing[16];
  size_t n = 0;
  for (size_t k = 0; k < c->n_sealed && n < 16; k++)
    if (!c->seen[k]) missing[n++] = c->sealed[k]->key;
  if (!n) return 0;
  char list[700];
  show_list(missing, n, list, sizeof list);
  return fail(c, "%s: missing %s; %s", c->shown, list, SF_REPUBLISH);
}

/* ------------------------------------------------------------------ manifest */

static const entry *top_file(const vctx *c, const char *name) {
  for (size_t k = 0; k < c->n_files; k++)
    if (c->files[k].data && strcmp(c->files[k].name, name) == 0) return &c->files[k];
  return NULL;
}

/* manifest.verify ignores any path with a component named manifest.json or seal.json. */
static int ignored_by_manifest(const char *rel) {
  for (const char *p = rel; p;) {
    const char *slash = strchr(p, '/');
    size_t len = slash ? (size_t)(slash - p) : strlen(p);
    if ((len == strlen(SF_MANIFEST) && !memcmp(p, SF_MANIFEST, len)) ||
        (len == strlen(SF_SEAL) && !memcmp(p, SF_SEAL, len)))
      return 1;
    p = slash ? slash + 1 : NULL;
  }
  return 0;
}

static int entry_ptr_cmp(const void *a, const void *b) {
  return strcmp((*(const entry *const *)a)->name, (*(const entry *const *)b)->name);
}

/* Python's manifest.verify: missing, then changed, then unexpected files. */
static int check_manifest_files(vctx *c, const sj_value *files_obj) {
  const sj_member **listed = files_obj && files_obj->type == SJ_OBJECT ? string_map(files_obj) : NULL;
  if (!listed)
    return fail(c, "%s/%s is malformed: \"files\" is not a {name: sha256} map; %s", c->shown,
                SF_MANIFEST, SF_REBUILD);
  size_t n_listed = files_obj->n, n_actual = 0;
  const entry **actual = malloc((c->n_files ? c->n_files : 1) * sizeof *actual);
  if (!actual) { free(listed); return fail(c, "out of memory"); }
  for (size_t k = 0; k < c->n_files; k++)
    if (!ignored_by_manifest(c->files[k].name)) actual[n_actual++] = &c->files[k];
  qsort(actual, n_actual, sizeof *actual, entry_ptr_cmp);
  const char *bad[3][16];
  size_t n_bad[3] = {0, 0, 0};
  for (size_t k = 0; k < n_listed; k++) {
    entry probe = {.name = listed[k]->key};
    const entry *pp = &probe;
    const entry **hit = bsearch(&pp, actual, n_actual, sizeof *actual, entry_ptr_cmp);
    if (!hit || strlen(listed[k]->key) != listed[k]->key_len) {
      if (n_bad[0] < 16) bad[0][n_bad[0]++] = listed[k]->key;
    } else if (!same_str(listed[k]->value, (*hit)->sha)) {
      if (n_bad[1] < 16) bad[1][n_bad[1]++] = listed[k]->key;
    }
  }
  for (size_t k = 0; k < n_actual; k++)
    if (find_member(listed, n_listed, actual[k]->name) < 0 && n_bad[2] < 16)
      bad[2][n_bad[2]++] = actual[k]->name;
  char list[700];
  int rc = 0;
  if (n_bad[0]) {
    show_list(bad[0], n_bad[0], list, sizeof list);
    rc = fail(c, "%s: missing %s listed in %s; the version folder is incomplete, %s", c->shown,
              list, SF_MANIFEST, SF_REBUILD);
  } else if (n_bad[1]) {
    show_list(bad[1], n_bad[1], list, sizeof list);
    rc = fail(c, "%s: sha256 of %s does not match %s; the artifact was modified after the build. "
                 "Do not serve it: %s", c->shown, list, SF_MANIFEST, SF_REBUILD);
  } else if (n_bad[2]) {
    show_list(bad[2], n_bad[2], list, sizeof list);
    rc = fail(c, "%s: unexpected files %s not listed in %s; remove them or %s", c->shown, list,
              SF_MANIFEST, SF_REBUILD);
  }
  free(actual);
  free(listed);
  return rc;
}

static int check_schema(vctx *c, const sj_value *schema, sf_manifest *out) {
  const sj_value *names = sj_get(schema, "names"), *shape = sj_get(schema, "row_shape");
  const sj_value *nan = sj_get(schema, "allow_nan"), *dtype = sj_get(schema, "dtype");
  if (!schema || schema->type != SJ_OBJECT || !names || names->type != SJ_ARRAY || !shape ||
      shape->type != SJ_ARRAY)
    return fail(c, "%s/%s: the schema needs \"names\" and \"row_shape\" lists; %s", c->shown,
                SF_MANIFEST, SF_REBUILD);
  if (shape->n != 1 || shape->items[0]->type != SJ_NUMBER || !shape->items[0]->is_int ||
      shape->items[0]->i < 1 || shape->items[0]->i > SF_MAX_FEATURES)
    return fail(c, "%s/%s: schema row_shape must be one positive dimension (flat rows of at most "
                   "%d features) for setsuna_forest; publish this model on the Python wrapper "
                   "or %s", c->shown, SF_MANIFEST, SF_MAX_FEATURES, SF_REBUILD);
  out->n_features = (int)shape->items[0]->i;
  if (names->n != (size_t)out->n_features)
    return fail(c, "%s/%s: the schema names %zu features but row_shape says %d; %s", c->shown,
                SF_MANIFEST, names->n, out->n_features, SF_REBUILD);
  if (nan && nan->type != SJ_TRUE && nan->type != SJ_FALSE)
    return fail(c, "%s/%s: schema allow_nan is not true or false; %s", c->shown, SF_MANIFEST, SF_REBUILD);
  out->allow_nan = nan && nan->type == SJ_TRUE;
  if (dtype && (dtype->type != SJ_STRING || strcmp(dtype->str, "float32")))
    return fail(c, "%s/%s: schema dtype must be \"float32\" for setsuna_forest; %s", c->shown,
                SF_MANIFEST, SF_REBUILD);
  out->feature_names = calloc((size_t)out->n_features, sizeof *out->feature_names);
  if (!out->feature_names) return fail(c, "out of memory");
  for (size_t k = 0; k < names->n; k++) {
    if (names->items[k]->type != SJ_STRING)
      return fail(c, "%s/%s: schema name %zu is not a string; %s", c->shown, SF_MANIFEST, k, SF_REBUILD);
    if (!(out->feature_names[k] = strdup(names->items[k]->str))) return fail(c, "out of memory");
  }
  return 0;
}

/* The library's verified bytes in a sealed memfd: what is loaded is what was hashed. */
static int make_memfd(vctx *c, const entry *e, sf_engine_spec *spec) {
  char label[64];
  snprintf(label, sizeof label, "setsuna:%.48s", e->name);
  int fd = memfd_create(label, MFD_CLOEXEC | MFD_ALLOW_SEALING);
  if (fd < 0) return fail(c, "%s: memfd_create for %s failed (%s)", c->shown, e->name, strerror(errno));
  size_t off = 0;
  while (off < e->size) {
    ssize_t w = write(fd, e->data + off, e->size - off);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) {
      int er = errno;
      close(fd);
      return fail(c, "%s: copying %s into memory failed (%s)", c->shown, e->name, strerror(er));
    }
    off += (size_t)w;
  }
  /* No later write through /proc/<pid>/fd can change it (best effort: old kernels lack seals). */
  (void)fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE | F_SEAL_SEAL);
  spec->lib_fd = fd;
  return 0;
}

static int check_engine(vctx *c, const char *engine, const sj_value *params, const char *where,
                        const sf_manifest *m, sf_engine_spec *spec) {
  char n[300];
  int kind = !strcmp(engine, "tl2cgen") ? SF_ENGINE_TL2CGEN : !strcmp(engine, "lleaves") ? SF_ENGINE_LLEAVES : 0;
  if (!kind)
    return fail(c, "%s/%s: %s engine %s is not served by setsuna_forest (tl2cgen, lleaves); %s",
                c->shown, SF_MANIFEST, where, SHOW(engine, n), SF_REBUILD);
  if (!params || params->type != SJ_OBJECT)
    return fail(c, "%s/%s: %s params are not an object; %s", c->shown, SF_MANIFEST, where, SF_REBUILD);
  const sj_value *lib = sj_get(params, "lib");
  if (lib && lib->type != SJ_STRING)
    return fail(c, "%s/%s: %s lib is not a string; %s", c->shown, SF_MANIFEST, where, SF_REBUILD);
  if (!lib && kind == SF_ENGINE_LLEAVES)
    return fail(c, "%s/%s: %s lleaves params need \"lib\" and \"n_features\"; %s", c->shown,
                SF_MANIFEST, where, SF_REBUILD);
  const char *name = lib ? lib->str : SF_TL2CGEN_LIB;
  size_t len = lib ? lib->len : strlen(name);
  /* A path, a hidden name or a ".." would load a file the hashes never covered. */
  if (!len || len >= sizeof spec->lib || len != strlen(name) || name[0] == '.' || strchr(name, '/'))
    return fail(c, "%s/%s: %s engine file '%s' is not a plain file name inside the version "
                   "folder; the manifest was edited or built by something else: %s", c->shown,
                SF_MANIFEST, where, show(name, len, n, sizeof n), SF_REBUILD);
  const entry *e = top_file(c, name);
  if (!e)
    return fail(c, "%s: %s engine file %s is not in the folder's verified files; %s", c->shown,
                where, SHOW(name, n), SF_REBUILD);
  spec->kind = kind;
  memcpy(spec->lib, name, len + 1);
  spec->n_features = -1;
  if (kind == SF_ENGINE_LLEAVES) {
    const sj_value *nf = sj_get(params, "n_features");
    if (!nf || nf->type != SJ_NUMBER || !nf->is_int || nf->i < 1 || nf->i != m->n_features)
      return fail(c, "%s/%s: %s lleaves n_features must be an integer equal to the schema's %d; %s",
                  c->shown, SF_MANIFEST, where, m->n_features, SF_REBUILD);
    spec->n_features = (int)nf->i;
    const sj_value *flags = sj_get(params, "cpu_flags_sha256");
    if (flags && flags->type != SJ_STRING && flags->type != SJ_NULL)
      return fail(c, "%s/%s: %s cpu_flags_sha256 is not a string; %s", c->shown, SF_MANIFEST,
                  where, SF_REBUILD);
    char here[17];
    sf_cpu_flags("/proc/cpuinfo", here);
    /* lleaves emits machine code for the CPU it compiled on: another CPU may SIGILL, and that
       takes the whole server down, not just this model. */
    if (flags && flags->type == SJ_STRING && flags->len && here[0] && strcmp(flags->str, here)) {
      char f[100];
      return fail(c, "%s: %s was compiled for a CPU with flags hash %s but this host's is %s; "
                     "running it could crash the server. Rebuild the model on this host (make "
                     "build-engines) and republish it, or serve its tl2cgen candidate", c->shown,
                  SHOW(name, n), show(flags->str, flags->len, f, sizeof f), here);
    }
  }
  return make_memfd(c, e, spec);
}

static int check_switch(vctx *c, const sj_value *params, sf_manifest *m) {
  const char *names[2] = {"small", "large"};
  sf_engine_spec *specs[2] = {&m->small, &m->large};
  if (!params || params->type != SJ_OBJECT)
    return fail(c, "%s/%s: switch engine_params are not an object; %s", c->shown, SF_MANIFEST, SF_REBUILD);
  const sj_value *t = sj_get(params, "threshold_rows");
  if (!t || t->type != SJ_NUMBER || !t->is_int || t->i < 2 || t->i > INT_MAX)
    return fail(c, "%s/%s: switch threshold_rows must be an integer >= 2; %s", c->shown,
                SF_MANIFEST, SF_REBUILD);
  m->threshold_rows = (int)t->i;
  for (int k = 0; k < 2; k++) {
    const sj_value *sub = sj_get(params, names[k]);
    const char *engine = sj_get_str(sub, "engine");
    if (!engine || !sj_get(sub, "params"))
      return fail(c, "%s/%s: switch \"%s\" needs \"engine\" and \"params\"; %s", c->shown,
                  SF_MANIFEST, names[k], SF_REBUILD);
    char where[32];
    snprintf(where, sizeof where, "switch %s", names[k]);
    if (check_engine(c, engine, sj_get(sub, "params"), where, m, specs[k])) return -1;
  }
  return 0;
}

static int copy_field(vctx *c, char *dst, size_t cap, const sj_value *v, const char *what) {
  if (!v || v->type != SJ_STRING || v->len >= cap || v->len != strlen(v->str))
    return fail(c, "%s/%s: \"%s\" is missing, not a string or too long; %s", c->shown,
                SF_MANIFEST, what, SF_REBUILD);
  memcpy(dst, v->str, v->len + 1);
  return 0;
}

static int check_manifest(vctx *c, sf_manifest *out) {
  const entry *e = top_file(c, SF_MANIFEST);
  if (!e)
    return fail(c, "%s/%s is missing: this folder was not written by build_engines; %s",
                c->shown, SF_MANIFEST, SF_REBUILD);
  if (e->size > SF_MAX_JSON_BYTES)
    return fail(c, "%s/%s is larger than 16 MiB; %s", c->shown, SF_MANIFEST, SF_REBUILD);
  char why[256];
  sj_value *doc = sj_parse((const char *)e->data, e->size, why, sizeof why);
  if (!doc) return fail(c, "%s/%s is malformed (%s); %s", c->shown, SF_MANIFEST, why, SF_REBUILD);
  int rc = -1;
  const sj_value *format = sj_get(doc, "format");
  if (!format || format->type != SJ_NUMBER || !format->is_int || format->i != 1) {
    fail(c, "%s/%s: manifest format %s is not 1: rebuild the model with this version of setsuna "
            "(make build-engines) and republish it", c->shown, SF_MANIFEST,
         format && format->type == SJ_NUMBER ? format->str : "(not a number)");
    goto done;
  }
  static const char *const required[] = {"candidate", "task", "source", "schema", "files"};
  for (size_t k = 0; k < sizeof required / sizeof *required; k++)
    if (!sj_get(doc, required[k])) {
      fail(c, "%s/%s is malformed: no \"%s\"; %s", c->shown, SF_MANIFEST, required[k], SF_REBUILD);
      goto done;
    }
  if (copy_field(c, out->model, sizeof out->model, sj_get(doc, "model"), "model") ||
      copy_field(c, out->engine, sizeof out->engine, sj_get(doc, "engine"), "engine") ||
      check_manifest_files(c, sj_get(doc, "files")))
    goto done;
  int is_switch = !strcmp(out->engine, "switch");
  if (!is_switch && strcmp(out->engine, "tl2cgen") && strcmp(out->engine, "lleaves")) {
    char n[64];
    fail(c, "%s/%s: engine %s is not served by setsuna_forest; publish it on the Python wrapper",
         c->shown, SF_MANIFEST, SHOW(out->engine, n));
    goto done;
  }
  if (check_schema(c, sj_get(doc, "schema"), out)) goto done;
  const sj_value *params = sj_get(doc, "engine_params");
  static const sj_value empty = {.type = SJ_OBJECT};
  if (!params) params = &empty; /* Python: data.get("engine_params", {}) */
  rc = is_switch ? check_switch(c, params, out)
                 : check_engine(c, out->engine, params, "the", out, &out->small);
done:
  sj_free(doc);
  return rc;
}

/* ------------------------------------------------------------------ entry points */

static int split_dir(vctx *c, const char *version_dir) {
  if (!version_dir || !*version_dir) return fail(c, "no version folder given");
  int w = snprintf(c->dir, sizeof c->dir, "%s", version_dir);
  if (w < 0 || (size_t)w >= sizeof c->dir) return fail(c, "the version folder path is too long");
  size_t len = strlen(c->dir);
  while (len > 1 && c->dir[len - 1] == '/') c->dir[--len] = '\0';
  show(c->dir, len, c->shown, sizeof c->shown);
  /* Lexical parent and names, as Python's Path(version_dir).parent / .name. */
  char *slash = strrchr(c->dir, '/');
  if (!slash) {
    snprintf(c->model_dir, sizeof c->model_dir, ".");
  } else if (slash == c->dir) {
    snprintf(c->model_dir, sizeof c->model_dir, "/");
  } else {
    memcpy(c->model_dir, c->dir, (size_t)(slash - c->dir));
    c->model_dir[slash - c->dir] = '\0';
  }
  c->version_name = slash ? slash + 1 : c->dir;
  const char *mslash = strrchr(c->model_dir, '/');
  c->model_name = !strcmp(c->model_dir, ".") ? "" : mslash ? mslash + 1 : c->model_dir;
  return 0;
}

static int run(vctx *c, const char *version_dir, const char *keys_path, sf_manifest *out) {
  char why[256];
  if (split_dir(c, version_dir)) return -1;
  if (sc_init(why, sizeof why)) return fail(c, "%s: cannot verify its seal: %s", c->shown, why);
  if (load_keys(c, keys_path)) return -1;
  int vfd = open(c->dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (vfd < 0)
    return fail(c, "cannot open the version folder %s (%s)", c->shown, strerror(errno));
  sj_value *seal = NULL;
  int rc = check_seal(c, vfd, out, &seal);
  if (!rc) {
    int dup_fd = dup(vfd); /* walk() closes what it is given */
    rc = dup_fd < 0 ? fail(c, "%s: dup failed (%s)", c->shown, strerror(errno))
                    : walk(c, dup_fd, NULL, 0);
  }
  if (!rc) rc = check_missing(c);
  if (!rc) rc = check_manifest(c, out);
  close(vfd);
  free(c->sealed); /* points into seal: release before it */
  c->sealed = NULL;
  sj_free(seal);
  return rc;
}

static void free_ctx(vctx *c) {
  for (size_t k = 0; k < c->n_files; k++) {
    free(c->files[k].name);
    free(c->files[k].data);
  }
  free(c->files);
  free(c->keys);
  free(c->sealed);
  free(c->seen);
  free(c);
}

SF_EXPORT void sf_manifest_release(sf_manifest *m) {
  if (!m) return;
  sf_engine_spec *specs[2] = {&m->small, &m->large};
  for (int k = 0; k < 2; k++)
    if (specs[k]->kind && specs[k]->lib_fd >= 0) close(specs[k]->lib_fd);
  if (m->feature_names) {
    for (int k = 0; k < m->n_features; k++) free(m->feature_names[k]);
    free(m->feature_names);
  }
  memset(m, 0, sizeof *m);
  m->small.lib_fd = m->large.lib_fd = -1;
}

SF_EXPORT int sf_verify_version(const char *version_dir, const char *trusted_keys_path,
                                sf_manifest *out, char *err, size_t err_len) {
  char scratch[8];
  if (!err || !err_len) { err = scratch; err_len = sizeof scratch; }
  err[0] = '\0';
  if (!out) { snprintf(err, err_len, "sf_verify_version: out is NULL"); return -1; }
  memset(out, 0, sizeof *out);
  out->small.lib_fd = out->large.lib_fd = -1;
  vctx *c = calloc(1, sizeof *c); /* large (paths): kept off the backend thread's stack */
  if (!c) { snprintf(err, err_len, "out of memory verifying %s", version_dir ? version_dir : "?"); return -1; }
  c->err = err;
  c->err_len = err_len;
  int rc = run(c, version_dir, trusted_keys_path, out);
  free_ctx(c);
  if (rc) {
    sf_manifest_release(out);
    if (!err[0]) snprintf(err, err_len, "verification of %s failed", version_dir ? version_dir : "?");
  }
  return rc ? -1 : 0;
}

/* ------------------------------------------------------------------ cpu flags */


static int str_cmp(const void *a, const void *b) {
  return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* Copies of [a, b) stripped, NUL-terminated, into dst (cap bytes); returns dst. */
static char *strip_into(const char *a, const char *b, char *dst, size_t cap) {
  while (a < b && is_ws((unsigned char)*a)) a++;
  while (b > a && is_ws((unsigned char)b[-1])) b--;
  size_t n = (size_t)(b - a) < cap - 1 ? (size_t)(b - a) : cap - 1;
  memcpy(dst, a, n);
  dst[n] = '\0';
  return dst;
}

SF_EXPORT void sf_cpu_flags(const char *cpuinfo_path, char out[17]) {
  out[0] = '\0';
  int fd = cpuinfo_path ? open(cpuinfo_path, O_RDONLY | O_CLOEXEC | O_NONBLOCK) : -1;
  if (fd < 0) return;
  /* /proc files report size 0, so read_fd's growth path does the work; 4 MiB covers the
     largest machines, and only the first processor's block is used anyway. */
  unsigned char *text;
  size_t len;
  if (read_fd(fd, (size_t)4 << 20, &text, &len)) return;
  char *model = calloc(1, 4096), *flags = malloc(len + 1);
  char **words = NULL;
  if (!model || !flags) goto done;
  flags[0] = '\0';
  const char *p = (const char *)text, *end = p + len;
  while (p < end) {
    const char *eol = p;
    while (eol < end && !is_line_break((unsigned char)*eol)) eol++;
    const char *a = p;
    while (a < eol && is_ws((unsigned char)*a)) a++;
    if (a == eol) break; /* the first processor is enough: the flags are per machine */
    const char *colon = memchr(p, ':', (size_t)(eol - p));
    char key[256];
    strip_into(p, colon ? colon : eol, key, sizeof key);
    if (colon && !strcmp(key, "model name")) strip_into(colon + 1, eol, model, 4096);
    else if (!strcmp(key, "model name")) model[0] = '\0';
    if (!strcmp(key, "flags")) strip_into(colon ? colon + 1 : eol, eol, flags, len + 1);
    p = eol + ((eol < end && *eol == '\r' && eol + 1 < end && eol[1] == '\n') ? 2 : 1);
  }
  /* The flags sorted and joined by one space, as " ".join(sorted(flags.split())). */
  size_t n = 0, cap = 0;
  char *save = NULL;
  for (char *tok = strtok_r(flags, ws_chars, &save); tok; tok = strtok_r(NULL, ws_chars, &save)) {
    if (n == cap) {
      cap = cap ? cap * 2 : 64;
      char **nw = realloc(words, cap * sizeof *nw);
      if (!nw) goto done;
      words = nw;
    }
    words[n++] = tok;
  }
  if (!n) goto done;
  qsort(words, n, sizeof *words, str_cmp);
  size_t mlen = strlen(model), total = mlen + 1;
  for (size_t k = 0; k < n; k++) total += strlen(words[k]) + 1;
  char *msg = malloc(total + 1);
  if (!msg) goto done;
  size_t o = 0;
  memcpy(msg, model, mlen);
  o = mlen;
  msg[o++] = '|';
  for (size_t k = 0; k < n; k++) {
    size_t wl = strlen(words[k]);
    if (k) msg[o++] = ' ';
    memcpy(msg + o, words[k], wl);
    o += wl;
  }
  unsigned char md[32];
  char why[128], hex[65];
  if (!sc_sha256(msg, o, md, why, sizeof why)) {
    sc_hex(md, 32, hex);
    memcpy(out, hex, 16);
    out[16] = '\0';
  }
  free(msg);
done:
  free(words);
  free(flags);
  free(model);
  free(text);
}

SF_EXPORT int sf_verify_describe(const char *version_dir, const char *trusted_keys_path, char *out,
                                 size_t cap) {
  sf_manifest m;
  char err[2048];
  int rc = sf_verify_version(version_dir, trusted_keys_path, &m, err, sizeof err);
  if (!out || !cap) { sf_manifest_release(&m); return rc; }
  if (rc) {
    snprintf(out, cap, "error: %s", err);
    return rc;
  }
  snprintf(out, cap,
           "ok engine=%s model=%s n_features=%d allow_nan=%d threshold_rows=%d small=%d:%s:%d "
           "large=%d:%s:%d",
           m.engine, m.model, m.n_features, m.allow_nan, m.threshold_rows, m.small.kind,
           m.small.lib, m.small.kind && m.small.lib_fd >= 0, m.large.kind, m.large.lib,
           m.large.kind && m.large.lib_fd >= 0);
  sf_manifest_release(&m);
  return rc;
}
