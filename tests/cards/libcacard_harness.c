/*
 * Drives libcacard's emulated CAC card in process through its public API, for the
 * side-by-side tests (tests/cards/test_cac_libcacard.py; built by libcacard_peer.py).
 *
 *   libcacard_harness 'db="sql:DIR" use_hw=no soft=(,ccidemu,CAC,,cert1,cert2,cert3)'
 *
 * prints READY once vcard_emul_init made the soft card in reader "ccidemu", then reads
 * one command a line from stdin:  "A <hex>"  -> vreader_xfr_bytes, prints "R <hex>"
 * (or "ERR <status>");  "P" -> power off and on, prints "ATR <hex>";  "Q" quits.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <libcacard.h>

static int unhex(const char *s, unsigned char *out, int cap) {
    int n = 0;
    while (s[0] && s[1] && n < cap) {
        unsigned int b;
        if (sscanf(s, "%2x", &b) != 1) return -1;
        out[n++] = (unsigned char)b;
        s += 2;
    }
    return n;
}

static void puthex(const char *tag, const unsigned char *b, int n) {
    printf("%s ", tag);
    for (int i = 0; i < n; i++) printf("%02x", b[i]);
    printf("\n");
    fflush(stdout);
}

int main(int argc, char **argv) {
    if (argc != 2) { fprintf(stderr, "usage: harness OPTIONS\n"); return 2; }
    VCardEmulOptions *options = vcard_emul_options(argv[1]);
    if (options == NULL || vcard_emul_init(options) != VCARD_EMUL_OK) {
        printf("INIT-FAILED\n"); fflush(stdout); return 1;
    }
    VReader *reader = vreader_get_reader_by_name("ccidemu");
    if (reader == NULL) { printf("NO-READER\n"); fflush(stdout); return 1; }
    printf("READY\n"); fflush(stdout);
    static char line[300000];
    static unsigned char cmd[70000], rsp[70000];
    while (fgets(line, sizeof line, stdin)) {
        line[strcspn(line, "\r\n")] = 0;
        if (line[0] == 'Q') break;
        if (line[0] == 'P') {
            int len = sizeof rsp;
            vreader_power_off(reader);
            vreader_power_on(reader, rsp, &len);
            puthex("ATR", rsp, len);
            continue;
        }
        if (line[0] == 'A' && line[1] == ' ') {
            int n = unhex(line + 2, cmd, sizeof cmd);
            int len = sizeof rsp;
            VReaderStatus st = vreader_xfr_bytes(reader, cmd, n, rsp, &len);
            if (st != VREADER_OK) { printf("ERR %d\n", (int)st); fflush(stdout); continue; }
            puthex("R", rsp, len);
            continue;
        }
        printf("BAD\n"); fflush(stdout);
    }
    vreader_free(reader);
    return 0;
}
