/* The page walk of a module-level PME re-encryption (keyrotation.formats.pme_modules), in C.
 *
 * Only the walk is here: the column chunk's (page header, page) pairs found, each header module's Thrift read
 * for the page's type, size and CRC, the associated data put together, nonces drawn, CRCs computed, each new
 * module compared with the old one's plaintext. AES-GCM itself is cryptography's AESGCM (decrypt_into,
 * encrypt_into), called on the objects pme_modules hands over: the same cipher as the Python walk and as the
 * benchmark's yardstick.
 *
 * The Python walk stays the reference. This one takes only what it can prove ordinary; a pair it does not take
 * (any error, any field it does not expect) it leaves unwritten and hands back, and the Python walk processes
 * that pair: its errors and their wording stay in one place. The one exception is a new module that does not
 * decrypt to the old one's plaintext, found after the new page is written (status VERIFY_*): pme_modules raises.
 *
 * pages(src, dst, old, new, aads, first, ordinal, dictionary, plain, check, crc_budget, final)
 *   src      bytes of the column chunk from the next pair on (a window of it); dst: where the new bytes go, as
 *            long as src (the same memory when the file is re-encrypted in place)
 *   aads     (dictionary header, dictionary page, data header, data page): the AADs, the data ones without the
 *            page ordinal
 *   first    the next pair is the chunk's first (the dictionary page if ``dictionary``); ordinal: the next data
 *            page's ordinal
 *   plain, check  work buffers (plaintext, and the check decryption of each new module)
 *   final    the window ends where the column chunk does
 * -> (status, used, first, ordinal, modules, module_bytes, crc_pages, crc_retries, detail)
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/random.h>
#include <zlib.h>

enum { ST_MORE, ST_END, ST_PYTHON, ST_FIT, ST_VERIFY_PAGE, ST_VERIFY_HEADER, ST_CRC };
#define NONCE 12
#define TAG 16
#define LEN 4
#define DICTIONARY_PAGE 2
#define INDEX_PAGE 1
#define POOL (NONCE * 256)

static PyObject *InvalidTag, *s_decrypt_into, *s_encrypt_into;

typedef struct {
    PyObject *old, *new_;
    unsigned char pool[POOL];
    Py_ssize_t at;
} Walk;

static int nonce(Walk *w, unsigned char *out) {
    if (w->at + NONCE > POOL) {
        Py_ssize_t got = 0;
        while (got < POOL) {
            ssize_t r = getrandom(w->pool + got, POOL - got, 0);
            if (r < 0) {
                if (errno == EINTR) continue;
                PyErr_SetFromErrno(PyExc_OSError);
                return -1;
            }
            got += r;
        }
        w->at = 0;
    }
    memcpy(out, w->pool + w->at, NONCE);
    w->at += NONCE;
    return 0;
}

/* aes.<name>(nonce, data, aad, out): 0 done, 1 the tag does not authenticate, -1 another error (set). */
static int gcm(PyObject *aes, PyObject *name, const unsigned char *nonce_, const unsigned char *data, Py_ssize_t n,
               const unsigned char *aad, Py_ssize_t aad_n, unsigned char *out, Py_ssize_t out_n) {
    PyObject *args[5] = {aes, NULL, NULL, NULL, NULL};
    int rc = -1;
    args[1] = PyMemoryView_FromMemory((char *)nonce_, NONCE, PyBUF_READ);
    args[2] = PyMemoryView_FromMemory((char *)data, n, PyBUF_READ);
    args[3] = PyMemoryView_FromMemory((char *)aad, aad_n, PyBUF_READ);
    args[4] = PyMemoryView_FromMemory((char *)out, out_n, PyBUF_WRITE);
    if (args[1] && args[2] && args[3] && args[4]) {
        PyObject *r = PyObject_VectorcallMethod(name, args, 5, NULL);
        if (r != NULL) {
            Py_DECREF(r);
            rc = 0;
        } else if (PyErr_ExceptionMatches(InvalidTag)) {
            PyErr_Clear();
            rc = 1;
        }
    }
    for (int i = 1; i < 5; i++) Py_XDECREF(args[i]);
    return rc;
}

/* -- Thrift compact, as much as a page header needs: -1 for anything else (the Python walk then judges) -- */
static Py_ssize_t varint(const unsigned char *d, Py_ssize_t pos, Py_ssize_t n, uint64_t *out) {
    uint64_t v = 0;
    for (int shift = 0; shift < 64; shift += 7) {
        if (pos >= n) return -1;
        unsigned char b = d[pos++];
        v |= (uint64_t)(b & 0x7F) << shift;
        if (!(b & 0x80)) {
            if (out) *out = v;
            return pos;
        }
    }
    return -1;
}

static Py_ssize_t skip(const unsigned char *d, Py_ssize_t pos, Py_ssize_t n, int kind, int depth) {
    uint64_t v;
    if (depth > 32) return -1;
    switch (kind) {
    case 1: case 2: return pos;
    case 3: return pos + 1 <= n ? pos + 1 : -1;
    case 7: return pos + 8 <= n ? pos + 8 : -1;
    case 4: case 5: case 6: return varint(d, pos, n, NULL);
    case 8:
        pos = varint(d, pos, n, &v);
        if (pos < 0 || v > (uint64_t)(n - pos)) return -1;
        return pos + (Py_ssize_t)v;
    case 9: case 10: {
        if (pos >= n) return -1;
        uint64_t count = d[pos] >> 4;
        int element = d[pos] & 0x0F;
        pos++;
        if (count == 15 && (pos = varint(d, pos, n, &count)) < 0) return -1;
        if (element == 1 || element == 2) {
            if (count > (uint64_t)(n - pos)) return -1;
            return pos + (Py_ssize_t)count;
        }
        if (count > (uint64_t)(n - pos)) return -1; /* every element takes a byte at least */
        for (uint64_t i = 0; i < count && pos >= 0; i++) pos = skip(d, pos, n, element, depth + 1);
        return pos;
    }
    case 11: {
        uint64_t size;
        if ((pos = varint(d, pos, n, &size)) < 0) return -1;
        if (!size) return pos;
        if (pos >= n || size > (uint64_t)(n - pos)) return -1;
        int types = d[pos++];
        for (uint64_t i = 0; i < size && pos >= 0; i++) {
            for (int k = 0; k < 2 && pos >= 0; k++) {
                int element = k ? types & 0x0F : types >> 4;
                if (element == 1 || element == 2) pos = pos + 1 <= n ? pos + 1 : -1;
                else pos = skip(d, pos, n, element, depth + 1);
            }
        }
        return pos;
    }
    case 12:
        for (;;) {
            if (pos >= n) return -1;
            int header = d[pos++];
            if (!header) return pos;
            if (!(header & 0xF0) && (pos = varint(d, pos, n, NULL)) < 0) return -1;
            int element = header & 0x0F;
            if (element != 1 && element != 2 && (pos = skip(d, pos, n, element, depth + 1)) < 0) return -1;
        }
    default:
        return -1;
    }
}

typedef struct {
    int64_t type, size, crc;
    int has_type, has_size, has_crc;
    Py_ssize_t crc_at, crc_size, end;
} Facts;

/* What thrift_compact.page_header() reads of a PageHeader: 0, or -1 where anything is unusual (a field id past 63
 * among them: the Python walk judges those). */
static int page_header(const unsigned char *d, Py_ssize_t n, Facts *f) {
    Py_ssize_t pos = 0;
    int64_t last = 0;
    uint64_t seen = 0, v;
    memset(f, 0, sizeof *f);
    for (;;) {
        if (pos >= n) return -1;
        int header = d[pos++];
        if (!header) {
            f->end = pos;
            return 0;
        }
        int kind = header & 0x0F;
        int64_t fid;
        if (header & 0xF0) {
            fid = last + (header >> 4);
        } else {
            if ((pos = varint(d, pos, n, &v)) < 0) return -1;
            fid = (int64_t)(v >> 1) ^ -(int64_t)(v & 1);
        }
        if (fid < 0 || fid > 63 || (seen >> fid) & 1) return -1;
        seen |= (uint64_t)1 << fid;
        last = fid;
        if (kind == 4 || kind == 5 || kind == 6) {
            Py_ssize_t start = pos;
            if ((pos = varint(d, pos, n, &v)) < 0) return -1;
            int64_t value = (int64_t)(v >> 1) ^ -(int64_t)(v & 1);
            if (fid == 1) f->type = value, f->has_type = 1;
            else if (fid == 3) f->size = value, f->has_size = 1;
            else if (fid == 4) f->crc = value, f->has_crc = 1, f->crc_at = start, f->crc_size = pos - start;
        } else if (fid == 1 || fid == 3 || fid == 4) {
            return -1;
        } else if (kind != 1 && kind != 2 && (pos = skip(d, pos, n, kind, 1)) < 0) {
            return -1;
        }
    }
}

/* ``value`` as a varint of exactly ``size`` bytes (thrift_compact.padded_varint): 0, or -1 where it needs more. */
static int padded_varint(uint32_t value, Py_ssize_t size, unsigned char *out) {
    unsigned char minimal[5];
    Py_ssize_t len = 0;
    do {
        minimal[len] = value & 0x7F;
        value >>= 7;
        if (value) minimal[len] |= 0x80;
        len++;
    } while (value);
    if (len > size) return -1;
    memcpy(out, minimal, len);
    if (len < size) {
        out[len - 1] |= 0x80;
        for (Py_ssize_t i = len; i < size - 1; i++) out[i] = 0x80;
        out[size - 1] = 0;
    }
    return 0;
}

static uint32_t le32(const unsigned char *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

/* A module (length, nonce, ciphertext, tag) of ``n`` bytes at ``out``, ``plain`` sealed under a fresh nonce. */
static int seal(Walk *w, const unsigned char *plain, Py_ssize_t size, const unsigned char *aad, Py_ssize_t aad_n,
                unsigned char *out) {
    uint32_t length = (uint32_t)(NONCE + size + TAG);
    out[0] = length & 0xFF, out[1] = (length >> 8) & 0xFF, out[2] = (length >> 16) & 0xFF, out[3] = length >> 24;
    if (nonce(w, out + LEN) < 0) return -1;
    return gcm(w->new_, s_encrypt_into, out + LEN, plain, size, aad, aad_n, out + LEN + NONCE, size + TAG);
}

/* 0: ``module`` decrypts under the new key to ``plain``; 1: it does not; -1: an error (set). */
static int verify(Walk *w, const unsigned char *module, const unsigned char *plain, Py_ssize_t size,
                  const unsigned char *aad, Py_ssize_t aad_n, unsigned char *check) {
    int rc = gcm(w->new_, s_decrypt_into, module + LEN, module + LEN + NONCE, size + TAG, aad, aad_n, check, size);
    if (rc) return rc;
    return memcmp(check, plain, size) ? 1 : 0;
}

static PyObject *pages(PyObject *self, PyObject *args) {
    Py_buffer src = {0}, dst = {0}, plain_buf = {0}, check_buf = {0};
    PyObject *aads;
    int first, dictionary, final;
    Py_ssize_t ordinal, crc_budget;
    Walk w;
    w.at = POOL;
    if (!PyArg_ParseTuple(args, "y*w*OOO!pnpw*w*np", &src, &dst, &w.old, &w.new_, &PyTuple_Type, &aads, &first,
                          &ordinal, &dictionary, &plain_buf, &check_buf, &crc_budget, &final))
        return NULL;
    PyObject *result = NULL;
    unsigned char *header = NULL, *aad = NULL;
    Py_ssize_t header_room = 0;
    const unsigned char *d = src.buf;
    unsigned char *o = dst.buf, *plain = plain_buf.buf, *check = check_buf.buf;
    Py_ssize_t n = src.len, pos = 0, detail = 0;
    long modules = 0, crc_pages = 0, crc_retries = 0;
    long long module_bytes = 0;
    int status = ST_END;
    const char *aad_of[4];
    Py_ssize_t aad_len[4];

    if (dst.len != n) {
        PyErr_SetString(PyExc_ValueError, "dst must be as long as src");
        goto done;
    }
    if (PyTuple_GET_SIZE(aads) != 4) {
        PyErr_SetString(PyExc_ValueError, "aads: four AADs");
        goto done;
    }
    Py_ssize_t widest = 0;
    for (int i = 0; i < 4; i++) {
        PyObject *item = PyTuple_GET_ITEM(aads, i);
        if (!PyBytes_Check(item)) {
            PyErr_SetString(PyExc_TypeError, "aads: bytes");
            goto done;
        }
        aad_of[i] = PyBytes_AS_STRING(item), aad_len[i] = PyBytes_GET_SIZE(item);
        if (aad_len[i] > widest) widest = aad_len[i];
    }
    if (!(aad = PyMem_Malloc(2 * (widest + 2)))) {
        PyErr_NoMemory();
        goto done;
    }
    unsigned char *header_aad = aad, *page_aad = aad + widest + 2;

    while (pos < n) {
        int is_dict = dictionary && first;
        Py_ssize_t header_aad_n, page_aad_n;
        if (is_dict) {
            memcpy(header_aad, aad_of[0], aad_len[0]), header_aad_n = aad_len[0];
            memcpy(page_aad, aad_of[1], aad_len[1]), page_aad_n = aad_len[1];
        } else {
            if (ordinal > 0x7FFF) { status = ST_PYTHON; break; }
            memcpy(header_aad, aad_of[2], aad_len[2]), header_aad_n = aad_len[2] + 2;
            memcpy(page_aad, aad_of[3], aad_len[3]), page_aad_n = aad_len[3] + 2;
            header_aad[aad_len[2]] = page_aad[aad_len[3]] = ordinal & 0xFF;
            header_aad[aad_len[2] + 1] = page_aad[aad_len[3] + 1] = (ordinal >> 8) & 0xFF;
        }
        /* the header module */
        if (pos + LEN > n) { status = final ? ST_PYTHON : ST_MORE; detail = 0; break; }
        Py_ssize_t header_len = LEN + (Py_ssize_t)le32(d + pos);
        Py_ssize_t header_size = header_len - LEN - NONCE - TAG;
        if (header_size <= 0) { status = ST_PYTHON; break; }
        if (header_len > n - pos) { status = final ? ST_PYTHON : ST_MORE; detail = header_len; break; }
        if (header_size > header_room) {
            if (header) {
                explicit_bzero(header, header_room);
                PyMem_Free(header);
            }
            header_room = header_size > 4096 ? header_size : 4096;
            if (!(header = PyMem_Malloc(header_room))) {
                header_room = 0;
                PyErr_NoMemory();
                goto done;
            }
        }
        int rc = gcm(w.old, s_decrypt_into, d + pos + LEN, d + pos + LEN + NONCE, header_size + TAG, header_aad,
                     header_aad_n, header, header_size);
        if (rc < 0) goto done;
        if (rc) { status = ST_PYTHON; break; }
        Facts f;
        if (page_header(header, header_size, &f) < 0 || !f.has_type || !f.has_size || f.size < 0
            || (f.type == DICTIONARY_PAGE) != is_dict || f.type == INDEX_PAGE) { status = ST_PYTHON; break; }
        int trailing = 0; /* parquet-java's zeros after the header are allowed, nothing else */
        for (Py_ssize_t i = f.end; i < header_size; i++) trailing |= header[i];
        if (trailing) { status = ST_PYTHON; break; }
        /* the page module */
        Py_ssize_t page_at = pos + header_len, page_len = (Py_ssize_t)f.size;
        if (page_len > n - page_at) {
            status = final ? ST_PYTHON : ST_MORE;
            detail = header_len + page_len;
            break;
        }
        Py_ssize_t size = page_len - LEN - NONCE - TAG;
        if (size < 0 || le32(d + page_at) != (uint32_t)(page_len - LEN)) { status = ST_PYTHON; break; }
        if (size > plain_buf.len || size > check_buf.len || header_size > check_buf.len) {
            status = ST_FIT;
            detail = page_len > header_len ? page_len : header_len;
            break;
        }
        rc = gcm(w.old, s_decrypt_into, d + page_at + LEN, d + page_at + LEN + NONCE, size + TAG, page_aad,
                 page_aad_n, plain, size);
        if (rc < 0) goto done;
        if (rc) { status = ST_PYTHON; break; }
        /* from here on the pair is this walk's: the new page, then the new header */
        unsigned char *page = o + page_at;
        Py_ssize_t tries = 1;
        if (f.has_crc) {
            tries = crc_budget / (page_len > 1 ? page_len : 1);
            if (tries < 1) tries = 1;
        }
        Py_ssize_t attempt = 0;
        for (;; attempt++) {
            if (attempt == tries) { status = ST_CRC; detail = tries; break; }
            if ((rc = seal(&w, plain, size, page_aad, page_aad_n, page)) < 0) goto done;
            if (rc) { status = ST_VERIFY_PAGE; break; } /* the new key refuses to seal: not seen, but not ours */
            if (!f.has_crc) break;
            uint32_t crc = (uint32_t)crc32(0L, page, (uInt)page_len);
            int32_t s = (int32_t)crc;
            uint32_t zz = ((uint32_t)s << 1) ^ (uint32_t)(s >> 31);
            if (padded_varint(zz, f.crc_size, header + f.crc_at) == 0) break;
        }
        if (status != ST_END) break;
        if ((rc = verify(&w, page, plain, size, page_aad, page_aad_n, check)) < 0) goto done;
        if (rc) { status = ST_VERIFY_PAGE; break; }
        if (f.has_crc) crc_pages++, crc_retries += attempt;
        if ((rc = seal(&w, header, header_size, header_aad, header_aad_n, o + pos)) < 0) goto done;
        if (!rc && (rc = verify(&w, o + pos, header, header_size, header_aad, header_aad_n, check)) < 0) goto done;
        if (rc) { status = ST_VERIFY_HEADER; break; }
        modules += 2;
        module_bytes += header_len + page_len;
        if (!is_dict) ordinal++;
        first = 0;
        pos = page_at + page_len;
    }
    result = Py_BuildValue("(innnlLlln)", status, pos, (Py_ssize_t)first, ordinal, modules, module_bytes,
                           crc_pages, crc_retries, detail);
done:
    if (header) {
        explicit_bzero(header, header_room);
        PyMem_Free(header);
    }
    PyMem_Free(aad);
    explicit_bzero(w.pool, sizeof w.pool);
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    PyBuffer_Release(&plain_buf);
    PyBuffer_Release(&check_buf);
    return result;
}

/* page_header(data): what the walk reads of a PageHeader, as thrift_compact.page_header gives it (type, size, crc,
 * crc_at, crc_size, end; None and -1 where absent), or None where the walk would hand the pair over. For tests. */
static PyObject *py_page_header(PyObject *self, PyObject *args) {
    Py_buffer data;
    Facts f;
    PyObject *result;
    if (!PyArg_ParseTuple(args, "y*", &data)) return NULL;
    if (page_header(data.buf, data.len, &f) < 0) {
        result = Py_NewRef(Py_None);
    } else {
        PyObject *type = f.has_type ? PyLong_FromLongLong(f.type) : Py_NewRef(Py_None);
        PyObject *size = f.has_size ? PyLong_FromLongLong(f.size) : Py_NewRef(Py_None);
        PyObject *crc = f.has_crc ? PyLong_FromLongLong(f.crc) : Py_NewRef(Py_None);
        result = (type && size && crc) ? Py_BuildValue("(OOOnnn)", type, size, crc, f.has_crc ? f.crc_at : -1,
                                                       f.has_crc ? f.crc_size : -1, f.end) : NULL;
        Py_XDECREF(type), Py_XDECREF(size), Py_XDECREF(crc);
    }
    PyBuffer_Release(&data);
    return result;
}

static PyMethodDef methods[] = {
    {"pages", pages, METH_VARARGS, "A column chunk's pages re-encrypted (see the source's comment)."},
    {"page_header", py_page_header, METH_VARARGS, "What the walk reads of a PageHeader, or None (see the source)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_pme_pages", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__pme_pages(void) {
    PyObject *exceptions = PyImport_ImportModule("cryptography.exceptions");
    if (!exceptions) return NULL;
    InvalidTag = PyObject_GetAttrString(exceptions, "InvalidTag");
    Py_DECREF(exceptions);
    if (!InvalidTag) return NULL;
    s_decrypt_into = PyUnicode_InternFromString("decrypt_into");
    s_encrypt_into = PyUnicode_InternFromString("encrypt_into");
    if (!s_decrypt_into || !s_encrypt_into) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    if (PyModule_AddIntConstant(m, "MORE", ST_MORE) || PyModule_AddIntConstant(m, "END", ST_END)
        || PyModule_AddIntConstant(m, "PYTHON", ST_PYTHON) || PyModule_AddIntConstant(m, "FIT", ST_FIT)
        || PyModule_AddIntConstant(m, "VERIFY_PAGE", ST_VERIFY_PAGE)
        || PyModule_AddIntConstant(m, "VERIFY_HEADER", ST_VERIFY_HEADER) || PyModule_AddIntConstant(m, "CRC", ST_CRC)) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
