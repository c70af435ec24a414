/*
 * argv_secret.so: keep Triton's admin key off its command line.
 *
 * Triton 2.51 takes the restricted-API key only as a command-line flag, and
 * /proc/<pid>/cmdline is readable by every local user, so the key would be
 * public on the host. setsuna starts tritonserver with a placeholder in that
 * flag and the key in the environment (/proc/<pid>/environ is readable only
 * by the same user, mode 0400), with this library in LD_PRELOAD. Before
 * main() runs, the constructor below swaps each argv pointer that holds the
 * placeholder for a heap copy with the key substituted: main() parses the
 * key, while /proc/<pid>/cmdline (the original argv memory) keeps showing the
 * placeholder. It then wipes the key's bytes from the environment block and
 * unsets the variable and LD_PRELOAD, so neither the server's environ nor any
 * child (the Python stubs, which run model code) ever holds the key.
 *
 * glibc passes (argc, argv, envp) to ELF constructors; argv is the very array
 * __libc_start_main later hands to main().
 */
#define _GNU_SOURCE
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define PLACEHOLDER "@SETSUNA_ADMIN_TOKEN@"
#define SECRET_ENV "SETSUNA_TRITON_ADMIN_KEY"
#define PRELOAD_ENV "LD_PRELOAD"
#define MARK_ENV "SETSUNA_ARGV_SECRET_SO"

static void forget_preload(void) {
  const char *mine = getenv(MARK_ENV);
  const char *preload = getenv(PRELOAD_ENV);
  if (mine != NULL && preload != NULL && strcmp(mine, preload) == 0) {
    unsetenv(PRELOAD_ENV);
  }
  unsetenv(MARK_ENV);
}

__attribute__((constructor)) static void setsuna_argv_secret(int argc, char **argv,
                                                             char **envp) {
  (void)envp;
  char *secret = getenv(SECRET_ENV);
  if (secret == NULL) {
    for (int i = 0; i < argc && argv != NULL; i++) {
      if (strstr(argv[i], PLACEHOLDER) != NULL) {
        _exit(78); /* EX_CONFIG: the placeholder must never become the key */
      }
    }
    forget_preload();
    return;
  }
  const size_t secret_len = strlen(secret);
  const size_t mark_len = sizeof(PLACEHOLDER) - 1;
  for (int i = 0; i < argc && argv != NULL; i++) {
    char *hit = strstr(argv[i], PLACEHOLDER);
    if (hit == NULL) {
      continue;
    }
    const size_t before = (size_t)(hit - argv[i]);
    const size_t after = strlen(hit + mark_len);
    char *out = malloc(before + secret_len + after + 1);
    if (out == NULL) {
      _exit(71); /* EX_OSERR: never start with the placeholder as the key */
    }
    memcpy(out, argv[i], before);
    memcpy(out + before, secret, secret_len);
    memcpy(out + before + secret_len, hit + mark_len, after + 1);
    argv[i] = out;
  }
  /* getenv() points into the environment block that /proc/<pid>/environ
     shows: wipe the bytes, then drop the entry for children. */
  memset(secret, 0, secret_len);
  unsetenv(SECRET_ENV);
  forget_preload();
}
