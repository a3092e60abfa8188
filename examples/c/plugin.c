/*
 * Loading libnsa as a plugin: dlopen it, look up the one symbol nsa_get_api, and call
 * everything else through the returned table. This file does not link against libnsa.
 *
 * Usage: nsa_plugin [path/to/libnsa.so.0]
 *
 * Without an argument it loads NSA_LIBRARY_PATH when the build defines it (CMake's
 * nsa::headers target does: the installed library's full path), else "libnsa.so.0",
 * which the dynamic loader finds through this program's rpath (nsa::headers adds one),
 * LD_LIBRARY_PATH or the ldconfig cache.
 */
#define _POSIX_C_SOURCE 200112L
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "nsa.h"

typedef const nsa_api_v2 *(*get_api_fn)(uint32_t);

static const nsa_api_v2 *api;

static int failed(nsa_status st) { /* reports through the table's own last-error function */
    if (st != NSA_STATUS_OK) fprintf(stderr, "plugin: %s: %s\n", api->status_string(st), api->last_error());
    return st != NSA_STATUS_OK;
}

int main(int argc, char **argv) {
#ifdef NSA_LIBRARY_PATH
    const char *path = argc > 1 ? argv[1] : NSA_LIBRARY_PATH;
#else
    const char *path = argc > 1 ? argv[1] : "libnsa.so.0";
#endif
    void *lib = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    get_api_fn get_api;
    nsa_config_t cfg;
    nsa_cache *cache = NULL;
    size_t bytes = 0;
    void *arena;
    uint32_t len = 0;
    nsa_step_seq_t prompt = {0, 100};

    if (lib == NULL) {
        fprintf(stderr, "dlopen %s: %s\n", path, dlerror());
        return 1;
    }
    /* ISO C forbids converting void* to a function pointer; copying the bytes is portable
       wherever dlsym works. */
    {
        void *sym = dlsym(lib, "nsa_get_api");
        if (sym == NULL) {
            fprintf(stderr, "%s has no nsa_get_api\n", path);
            return 1;
        }
        *(void **)(&get_api) = sym;
    }
    if (get_api(NSA_ABI_VERSION + 1) != NULL) return 1; /* a version it does not implement */
    {
        /* Why it refused: nsa_last_error is exported by every version, no table needed. */
        const char *(*last_error)(void);
        const char *why;
        void *sym = dlsym(lib, "nsa_last_error");
        if (sym == NULL) return 1;
        *(void **)(&last_error) = sym;
        why = last_error();
        if (why == NULL || strstr(why, "abi_version") == NULL) {
            fprintf(stderr, "plugin: no reason for the refused ABI version: %s\n", why ? why : "(null)");
            return 1;
        }
        printf("plugin: ABI %d refused as expected: %s\n", NSA_ABI_VERSION + 1, why);
    }
    api = get_api(NSA_ABI_VERSION);
    if (api == NULL || api->struct_size < sizeof *api) {
        fprintf(stderr, "%s does not implement nsa ABI %d\n", path, NSA_ABI_VERSION);
        return 1;
    }
    printf("plugin: loaded %s: nsa %s, ABI %u, table of %u bytes\n", path, api->version_string(), api->abi_version,
           api->struct_size);

    cfg.struct_size = sizeof cfg;
    if (failed(api->config_preset(NSA_PRESET_FLA, &cfg)) || failed(api->cache_arena_size(&cfg, &bytes))) return 1;
    arena = malloc(bytes); /* 16-byte aligned on 64-bit glibc */
    if (arena == NULL || failed(api->cache_init(&cfg, arena, bytes, &cache)) || failed(api->cache_add(cache, 0)) ||
        failed(api->cache_plan_step(cache, &prompt, 1)) || failed(api->cache_len(cache, 0, &len)))
        return 1;
    printf("plugin: cache of %zu bytes, sequence 0 planned to %u tokens\n", bytes, len);
    api->cache_deinit(cache);
    free(arena);
    dlclose(lib);
    printf("OK\n");
    return len == 100 ? 0 : 1;
}
