/*
 * libdomsnap from C, using the header alone: define and start a domain with two qcow2 disks,
 * take a live snapshot (vda internal, vdb external), list and show it, rescan the disks, get
 * and set the current snapshot, list with filters, revert to it, delete it, and check the code
 * of every kind of bad input. Run by crates/capi/tests/c_smoke.rs, plainly
 * and under valgrind.
 *
 * usage: smoke STATE_DIR CONFIG.toml DOMAIN SERIAL_LOG OVERLAY_PATH
 */
#define _POSIX_C_SOURCE 200809L

#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "domsnap.h"

static int passed, failed;
static struct timespec started;

/* Seconds since the program started. */
static double elapsed(void) {
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (double)(now.tv_sec - started.tv_sec) + (double)(now.tv_nsec - started.tv_nsec) / 1e9;
}

#define CHECK(cond)                                                                  \
    do {                                                                             \
        if (cond) {                                                                  \
            passed++;                                                                \
        } else {                                                                     \
            failed++;                                                                \
            fprintf(stderr, "FAIL %s:%d: %s\n", __FILE__, __LINE__, #cond);          \
        }                                                                            \
    } while (0)

/* A call that must succeed; prints its error otherwise. */
static void expect_ok(domsnap_ctx *ctx, int rc, const char *what) {
    int code = -1;
    const char *message = domsnap_last_error(ctx, &code);
    if (rc == 0 && code == DOMSNAP_OK && message[0] == '\0') {
        passed++;
        printf("ok: %s (at %.1f s)\n", what, elapsed());
    } else {
        failed++;
        fprintf(stderr, "FAIL: %s: rc %d, %s: %s\n", what, rc, domsnap_code_name(code), message);
    }
}

/* A call that must fail with `want`. */
static void expect_code(domsnap_ctx *ctx, int rc, int want, const char *what) {
    int code = -1;
    const char *message = domsnap_last_error(ctx, &code);
    if (rc == -1 && code == want && message[0] != '\0') {
        passed++;
        printf("ok: %s: %s: %s\n", what, domsnap_code_name(code), message);
    } else {
        failed++;
        fprintf(stderr, "FAIL: %s: rc %d, want %s, got %s: %s\n", what, rc, domsnap_code_name(want),
                domsnap_code_name(code), message);
    }
}

/* Whether the file at `path` contains `needle` within `seconds`. */
static int wait_for_text(const char *path, const char *needle, int seconds) {
    static char buffer[1 << 20];
    for (int tries = 0; tries < seconds * 10; tries++) {
        FILE *file = fopen(path, "r");
        if (file) {
            size_t length = fread(buffer, 1, sizeof buffer - 1, file);
            fclose(file);
            buffer[length] = '\0';
            if (strstr(buffer, needle)) {
                return 1;
            }
        }
        struct timespec pause = {0, 100 * 1000 * 1000};
        nanosleep(&pause, NULL);
    }
    return 0;
}

/* The progress callback: counts steps and notes the disk step (any thread may call it). */
struct progress {
    atomic_int steps;
    atomic_int saw_disks;
};

static void on_step(const char *operation, const char *step, void *user) {
    struct progress *progress = user;
    atomic_fetch_add(&progress->steps, 1);
    if (strcmp(operation, "create") == 0 && strcmp(step, "snapshot-disks") == 0) {
        atomic_store(&progress->saw_disks, 1);
    }
}

/* Bad input without a context. */
static void check_without_context(void) {
    domsnap_ctx *ctx = (domsnap_ctx *)1;
    int code = -1;
    CHECK(domsnap_ctx_open(NULL, &ctx) == -1);
    CHECK(ctx == NULL);
    domsnap_last_error(NULL, &code);
    CHECK(code == DOMSNAP_INVALID_ARGUMENT);
    expect_code(NULL, domsnap_ctx_open("/tmp", NULL), DOMSNAP_INVALID_ARGUMENT, "open: out NULL");
    domsnap_snapshot_args args = {0};
    args.name = "s";
    expect_code(NULL, domsnap_snapshot_create(NULL, "d", &args, false), DOMSNAP_INVALID_ARGUMENT,
                "create: ctx NULL");
    CHECK(strcmp(domsnap_code_name(DOMSNAP_FAILED_ROLLED_BACK), "failed_rolled_back") == 0);
    CHECK(strcmp(domsnap_code_name(DOMSNAP_OK), "ok") == 0);
    CHECK(domsnap_code_name(1000) == NULL);
    domsnap_ctx_close(NULL);
    domsnap_string_free(NULL);
}

/* Every kind of bad input to create and the other calls, on a running domain holding s1. */
static void check_bad_input(domsnap_ctx *ctx, const char *domain, const char *config) {
    domsnap_disk_args disk = {0};
    domsnap_snapshot_args args = {0};
    args.name = "s2";
    args.memory = true;
    char *json = (char *)1;

    expect_code(ctx, domsnap_snapshot_create(ctx, "nosuch", &args, false), DOMSNAP_NOT_FOUND,
                "create: unknown domain");
    args.name = "s1";
    expect_code(ctx, domsnap_snapshot_create(ctx, domain, &args, true), DOMSNAP_ALREADY_EXISTS,
                "create: duplicate name");
    args.name = NULL;
    expect_code(ctx, domsnap_snapshot_create(ctx, domain, &args, false), DOMSNAP_INVALID_ARGUMENT,
                "create: NULL name");
    args.name = "../bad";
    expect_code(ctx, domsnap_snapshot_create(ctx, domain, &args, false), DOMSNAP_INVALID_ARGUMENT,
                "create: bad name");
    args.name = "s2";
    expect_code(ctx, domsnap_snapshot_create(ctx, domain, NULL, false), DOMSNAP_INVALID_ARGUMENT,
                "create: NULL args");
    expect_code(ctx, domsnap_snapshot_create(ctx, NULL, &args, false), DOMSNAP_INVALID_ARGUMENT,
                "create: NULL domain");
    expect_code(ctx, domsnap_snapshot_create(ctx, "\xff\xfe", &args, false),
                DOMSNAP_INVALID_ARGUMENT, "create: domain not UTF-8");

    disk.device = "vdz";
    args.num_disks = 1;
    args.disks = &disk;
    expect_code(ctx, domsnap_snapshot_create(ctx, domain, &args, false), DOMSNAP_INVALID_ARGUMENT,
                "create: unknown disk device");
    disk.device = "vda";
    disk.name = "123";
    expect_code(ctx, domsnap_snapshot_create(ctx, domain, &args, false), DOMSNAP_INVALID_ARGUMENT,
                "create: per-disk internal name all digits");
    disk.name = NULL;
    disk.exclude = true;
    disk.external = true;
    expect_code(ctx, domsnap_snapshot_create(ctx, domain, &args, false), DOMSNAP_INVALID_ARGUMENT,
                "create: a disk both left out and external");
    disk.exclude = false;
    disk.external = true;
    disk.external_format = "raw";
    expect_code(ctx, domsnap_snapshot_create(ctx, domain, &args, false), DOMSNAP_UNSUPPORTED,
                "create: raw overlay");
    args.num_disks = 0;
    args.disks = NULL;
    args.memory_path = config; /* exists */
    expect_code(ctx, domsnap_snapshot_create(ctx, domain, &args, false), DOMSNAP_INVALID_ARGUMENT,
                "create: memory_path exists");
    args.memory_path = "/nonexistent/memory.img";
    expect_code(ctx, domsnap_snapshot_create(ctx, domain, &args, false), DOMSNAP_INVALID_ARGUMENT,
                "create: memory_path in a missing folder");
    args.memory = false;
    expect_code(ctx, domsnap_snapshot_create(ctx, domain, &args, false), DOMSNAP_INVALID_ARGUMENT,
                "create: memory_path of a disk-only snapshot");
    args.memory_path = NULL;
    args.memory = true;
    args.quiesce = true; /* the test domain has no guest agent channel */
    expect_code(ctx, domsnap_snapshot_create(ctx, domain, &args, true), DOMSNAP_UNSUPPORTED,
                "create: quiesce without a guest agent");
    args.quiesce = false;
    args.memory = false;

    expect_code(ctx, domsnap_snapshot_show(ctx, domain, "s2", &json), DOMSNAP_NOT_FOUND,
                "show: unknown snapshot");
    CHECK(json == NULL);
    expect_code(ctx, domsnap_snapshot_show(ctx, domain, "s1", NULL), DOMSNAP_INVALID_ARGUMENT,
                "show: json_out NULL");
    expect_code(ctx, domsnap_snapshot_list(ctx, "nosuch", &json), DOMSNAP_NOT_FOUND,
                "list: unknown domain");
    expect_code(ctx, domsnap_snapshot_delete(ctx, domain, &args), DOMSNAP_NOT_FOUND,
                "delete: unknown snapshot");
    expect_code(ctx, domsnap_snapshot_revert(ctx, domain, &args), DOMSNAP_NOT_FOUND,
                "revert: unknown snapshot");
    expect_code(ctx, domsnap_domain_start(ctx, domain, false), DOMSNAP_INVALID_ARGUMENT,
                "start: already running");
    expect_code(ctx, domsnap_domain_define(ctx, "/nonexistent/domain.toml"), DOMSNAP_NOT_FOUND,
                "define: no such file");
    expect_code(ctx, domsnap_domain_define(ctx, config), DOMSNAP_INVALID_ARGUMENT,
                "define: while running");
}

/* Whether the JSON document `json` contains `needle`; frees it. */
static int json_has(char *json, const char *needle) {
    int found = json != NULL && strstr(json, needle) != NULL;
    if (!found) {
        fprintf(stderr, "JSON without %s: %s\n", needle, json ? json : "(null)");
    }
    domsnap_string_free(json);
    return found;
}

/* Whether `name` is `want` (NULL: none); frees it. */
static int name_is(char *name, const char *want) {
    int same = (name == NULL || want == NULL) ? name == want : strcmp(name, want) == 0;
    if (!same) {
        fprintf(stderr, "name %s, want %s\n", name ? name : "(null)", want ? want : "(null)");
    }
    domsnap_string_free(name);
    return same;
}

/* Rescan, the current snapshot and the list filters, on a domain holding s1 (current) only. */
static void check_rescan_and_current(domsnap_ctx *ctx, const char *domain) {
    char *json = NULL, *name = (char *)1;
    expect_ok(ctx, domsnap_snapshot_current(ctx, domain, &name), "current");
    CHECK(name_is(name, "s1"));
    expect_ok(ctx, domsnap_snapshot_rescan(ctx, domain, NULL, &json), "rescan");
    CHECK(json_has(json, "\"broken\":[]"));
    expect_ok(ctx, domsnap_snapshot_rescan(ctx, domain, "s1", &json), "rescan s1");
    CHECK(json_has(json, "\"first\":false"));
    expect_code(ctx, domsnap_snapshot_rescan(ctx, domain, "nosuch", &json), DOMSNAP_NOT_FOUND,
                "rescan: unknown snapshot");
    CHECK(json == NULL);
    expect_code(ctx, domsnap_snapshot_rescan(ctx, NULL, NULL, &json), DOMSNAP_INVALID_ARGUMENT,
                "rescan: NULL domain");
    expect_code(ctx, domsnap_snapshot_rescan(ctx, domain, NULL, NULL), DOMSNAP_INVALID_ARGUMENT,
                "rescan: json_out NULL");
    expect_code(ctx, domsnap_snapshot_set_current(ctx, domain, "nosuch"), DOMSNAP_NOT_FOUND,
                "set current: unknown snapshot");
    expect_code(ctx, domsnap_snapshot_set_current(ctx, domain, NULL), DOMSNAP_INVALID_ARGUMENT,
                "set current: NULL name");
    expect_code(ctx, domsnap_snapshot_current(ctx, domain, NULL), DOMSNAP_INVALID_ARGUMENT,
                "current: name_out NULL");
    expect_ok(ctx, domsnap_snapshot_set_current(ctx, domain, "s1"), "set current s1");
    expect_ok(ctx, domsnap_snapshot_list_filtered(ctx, domain, DOMSNAP_LIST_ROOTS, &json), "roots");
    CHECK(json_has(json, "\"name\":\"s1\""));
    expect_ok(ctx, domsnap_snapshot_list_filtered(ctx, domain, DOMSNAP_LIST_CURRENT, &json),
              "current only");
    CHECK(json_has(json, "\"current\":\"s1\""));
    expect_code(ctx, domsnap_snapshot_list_filtered(ctx, domain, 42, &json),
                DOMSNAP_INVALID_ARGUMENT, "list: no such filter");
}

int main(int argc, char **argv) {
    if (argc != 6) {
        fprintf(stderr, "usage: %s STATE_DIR CONFIG.toml DOMAIN SERIAL_LOG OVERLAY_PATH\n", argv[0]);
        return 2;
    }
    clock_gettime(CLOCK_MONOTONIC, &started);
    const char *state_dir = argv[1], *config = argv[2], *domain = argv[3], *serial = argv[4];
    check_without_context();

    domsnap_ctx *ctx = NULL;
    if (domsnap_ctx_open(state_dir, &ctx) != 0) {
        fprintf(stderr, "domsnap_ctx_open: %s\n", domsnap_last_error(NULL, NULL));
        return 1;
    }
    struct progress progress = {0};
    expect_ok(ctx, domsnap_ctx_set_progress(ctx, on_step, &progress), "set progress");
    expect_ok(ctx, domsnap_domain_define(ctx, config), "define");
    expect_ok(ctx, domsnap_domain_start(ctx, domain, false), "start");
    CHECK(wait_for_text(serial, "DOMSNAP READY", 120));

    /* The memory image beside the overlay, outside the state directory. */
    char memory_path[4096];
    snprintf(memory_path, sizeof memory_path, "%s.memory", argv[5]);
    domsnap_disk_args disks[2] = {{0}, {0}};
    disks[0].device = "vda";
    disks[0].name = "vda-s1"; /* its own internal snapshot name */
    disks[1].device = "vdb";
    disks[1].external = true;
    disks[1].external_format = "qcow2";
    disks[1].external_path = argv[5];
    domsnap_snapshot_args args = {0};
    args.name = "s1";
    args.description = "from C";
    args.memory = true;
    args.memory_path = memory_path;
    args.num_disks = 2;
    args.disks = disks;
    expect_ok(ctx, domsnap_snapshot_create(ctx, domain, &args, true), "create s1 (live)");
    CHECK(access(memory_path, F_OK) == 0);
    CHECK(atomic_load(&progress.steps) > 3);
    CHECK(atomic_load(&progress.saw_disks) == 1);
    CHECK(access(argv[5], F_OK) == 0);

    char *json = NULL;
    expect_ok(ctx, domsnap_snapshot_list(ctx, domain, &json), "list");
    CHECK(json_has(json, "\"current\":\"s1\""));
    expect_ok(ctx, domsnap_snapshot_list(ctx, domain, &json), "list again");
    CHECK(json_has(json, "\"version\":1"));
    expect_ok(ctx, domsnap_snapshot_show(ctx, domain, "s1", &json), "show");
    CHECK(json_has(json, "\"kind\":\"external\""));
    expect_ok(ctx, domsnap_snapshot_show(ctx, domain, "s1", &json), "show the internal name");
    CHECK(json_has(json, "\"name\":\"vda-s1\""));

    /* Disk-only of the running domain, vdb left out. */
    domsnap_disk_args only_vda[1] = {{0}};
    only_vda[0].device = "vdb";
    only_vda[0].exclude = true;
    domsnap_snapshot_args disk_only = {0};
    disk_only.name = "d1";
    disk_only.memory = false;
    disk_only.num_disks = 1;
    disk_only.disks = only_vda;
    expect_ok(ctx, domsnap_snapshot_create(ctx, domain, &disk_only, false), "create d1 (disk-only)");
    expect_ok(ctx, domsnap_snapshot_show(ctx, domain, "d1", &json), "show d1");
    CHECK(json_has(json, "\"kind\":\"excluded\""));
    expect_ok(ctx, domsnap_snapshot_delete(ctx, domain, &disk_only), "delete d1");

    check_rescan_and_current(ctx, domain);
    check_bad_input(ctx, domain, config);

    expect_ok(ctx, domsnap_snapshot_revert(ctx, domain, &args), "revert to s1");
    expect_ok(ctx, domsnap_snapshot_show(ctx, domain, "s1", &json), "show after revert");
    CHECK(json_has(json, "\"current\":true"));
    expect_ok(ctx, domsnap_snapshot_delete(ctx, domain, &args), "delete s1");
    CHECK(access(memory_path, F_OK) != 0);
    expect_ok(ctx, domsnap_snapshot_list(ctx, domain, &json), "list after delete");
    CHECK(json_has(json, "\"snapshots\":[]"));
    char *none = (char *)1;
    expect_ok(ctx, domsnap_snapshot_current(ctx, domain, &none), "current after delete");
    CHECK(name_is(none, NULL));
    expect_ok(ctx, domsnap_domain_stop(ctx, domain, true), "stop");
    domsnap_ctx_close(ctx);

    printf("%d passed, %d failed\n", passed, failed);
    return failed == 0 ? 0 : 1;
}
