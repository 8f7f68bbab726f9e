/*
 * _cborcore: the common case of engine.cbor.dumps in C.
 *
 * encode(obj) returns the RFC 8949 section 4.2.1 core deterministic encoding of obj, or None
 * when obj holds anything outside the common subset, in which case engine.cbor falls back to
 * its Python path (which is the reference: the tests check both give identical bytes).
 *
 * Common subset: None, bool, int in [-2**64, 2**64 - 1], float, str, bytes, list, tuple, and
 * dict whose keys are all str (exact types only; subclasses fall back). Deterministic rules:
 * shortest heads; floats in the shortest of binary16/32/64 that round-trips exactly, NaN as
 * f97e00; definite lengths; map keys sorted by their encodings, which for text keys is
 * (UTF-8 length, UTF-8 bytes) because the head grows with the length.
 *
 * decode(data) returns the value of the first CBOR item in data (trailing bytes ignored, as
 * cbor2 does), or the module's FALLBACK object when the item holds anything outside the
 * decode subset or is not well-formed: engine.cbor then hands the bytes to cbor2, whose
 * result (or error) is the reference. Decode subset: unsigned and negative integers (to
 * -2**64), byte and text strings (UTF-8, strict), arrays (lists), maps (dicts) whose keys
 * are text, integers or bytes, false/true/null, and binary16/32/64 floats; definite lengths
 * only. Tags, indefinite lengths, undefined and other simple values fall back. Every length
 * is checked against the bytes left before anything is allocated, and nesting is bounded.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_DEPTH 200

typedef struct {
    char *buf;
    Py_ssize_t len;
    Py_ssize_t cap;
} Buf;

/* 0 ok, -1 memory error (Python error set), 1 fallback (no error set) */
#define OK 0
#define ERR -1
#define FALLBACK 1

static int
grow(Buf *b, Py_ssize_t need)
{
    if (b->len + need <= b->cap)
        return OK;
    Py_ssize_t cap = b->cap * 2;
    while (cap < b->len + need)
        cap *= 2;
    char *nb = PyMem_Realloc(b->buf, (size_t)cap);
    if (nb == NULL) {
        PyErr_NoMemory();
        return ERR;
    }
    b->buf = nb;
    b->cap = cap;
    return OK;
}

static int
put(Buf *b, const void *p, Py_ssize_t n)
{
    if (grow(b, n) < 0)
        return ERR;
    memcpy(b->buf + b->len, p, (size_t)n);
    b->len += n;
    return OK;
}

static int
head(Buf *b, unsigned major, uint64_t v)
{
    unsigned char h[9];
    Py_ssize_t n;
    unsigned char m = (unsigned char)(major << 5);
    if (v < 24) {
        h[0] = m | (unsigned char)v;
        n = 1;
    } else if (v <= 0xFF) {
        h[0] = m | 24;
        h[1] = (unsigned char)v;
        n = 2;
    } else if (v <= 0xFFFF) {
        h[0] = m | 25;
        h[1] = (unsigned char)(v >> 8);
        h[2] = (unsigned char)v;
        n = 3;
    } else if (v <= 0xFFFFFFFFULL) {
        h[0] = m | 26;
        for (int i = 0; i < 4; i++)
            h[1 + i] = (unsigned char)(v >> (24 - 8 * i));
        n = 5;
    } else {
        h[0] = m | 27;
        for (int i = 0; i < 8; i++)
            h[1 + i] = (unsigned char)(v >> (56 - 8 * i));
        n = 9;
    }
    return put(b, h, n);
}

static int
enc_float(Buf *b, double x)
{
    unsigned char out[9];
    if (isnan(x)) {
        static const unsigned char nan16[3] = {0xf9, 0x7e, 0x00};
        return put(b, nan16, 3);
    }
    /* binary16, if exact (PyFloat_Pack2 fails with OverflowError beyond its range) */
    if (PyFloat_Pack2(x, (char *)out + 1, 0) == 0) {
        if (PyFloat_Unpack2((const char *)out + 1, 0) == x) {
            out[0] = 0xf9;
            return put(b, out, 3);
        }
    } else {
        PyErr_Clear();
    }
    if (PyFloat_Pack4(x, (char *)out + 1, 0) == 0) {
        if (PyFloat_Unpack4((const char *)out + 1, 0) == x) {
            out[0] = 0xfa;
            return put(b, out, 5);
        }
    } else {
        PyErr_Clear();
    }
    if (PyFloat_Pack8(x, (char *)out + 1, 0) < 0)
        return ERR;
    out[0] = 0xfb;
    return put(b, out, 9);
}

typedef struct {
    const char *key;
    Py_ssize_t klen;
    PyObject *value;
} Item;

static int
item_cmp(const void *pa, const void *pb)
{
    const Item *a = pa, *b = pb;
    if (a->klen != b->klen)
        return a->klen < b->klen ? -1 : 1;
    return memcmp(a->key, b->key, (size_t)a->klen);
}

static int enc(Buf *b, PyObject *o, int depth);

static int
enc_dict(Buf *b, PyObject *o, int depth)
{
    Py_ssize_t n = PyDict_GET_SIZE(o);
    Item stack_items[32];
    Item *items = n <= 32 ? stack_items : PyMem_Malloc(sizeof(Item) * (size_t)n);
    if (items == NULL) {
        PyErr_NoMemory();
        return ERR;
    }
    Py_ssize_t pos = 0, i = 0;
    PyObject *k, *v;
    int rc = OK;
    while (PyDict_Next(o, &pos, &k, &v)) {
        if (!PyUnicode_CheckExact(k)) {
            rc = FALLBACK;
            goto done;
        }
        Py_ssize_t kl;
        const char *ks = PyUnicode_AsUTF8AndSize(k, &kl);
        if (ks == NULL) {  /* lone surrogate: the Python path words the error */
            PyErr_Clear();
            rc = FALLBACK;
            goto done;
        }
        items[i].key = ks;
        items[i].klen = kl;
        items[i].value = v;
        i++;
    }
    if (n > 1)
        qsort(items, (size_t)n, sizeof(Item), item_cmp);
    if ((rc = head(b, 5, (uint64_t)n)) != OK)
        goto done;
    for (i = 0; i < n; i++) {
        if ((rc = head(b, 3, (uint64_t)items[i].klen)) != OK)
            goto done;
        if ((rc = put(b, items[i].key, items[i].klen)) != OK)
            goto done;
        if ((rc = enc(b, items[i].value, depth + 1)) != OK)
            goto done;
    }
done:
    if (items != stack_items)
        PyMem_Free(items);
    return rc;
}

static int
enc(Buf *b, PyObject *o, int depth)
{
    if (depth > MAX_DEPTH)
        return FALLBACK;
    if (o == Py_None) {
        unsigned char c = 0xf6;
        return put(b, &c, 1);
    }
    if (o == Py_True || o == Py_False) {
        unsigned char c = o == Py_True ? 0xf5 : 0xf4;
        return put(b, &c, 1);
    }
    if (PyLong_CheckExact(o)) {
        int overflow = 0;
        long long v = PyLong_AsLongLongAndOverflow(o, &overflow);
        if (v == -1 && PyErr_Occurred())
            return ERR;
        if (!overflow)
            return v >= 0 ? head(b, 0, (uint64_t)v) : head(b, 1, (uint64_t)(-(v + 1)));
        if (overflow > 0) {
            unsigned long long u = PyLong_AsUnsignedLongLong(o);
            if (u == (unsigned long long)-1 && PyErr_Occurred()) {
                PyErr_Clear();
                return FALLBACK;  /* beyond 64 bits: a bignum, the Python path's job */
            }
            return head(b, 0, (uint64_t)u);
        }
        /* below -2**63: -1 - v fits in uint64 down to -2**64 */
        PyObject *neg = PyNumber_Negative(o);
        if (neg == NULL)
            return ERR;
        PyObject *one = PyLong_FromLong(1);
        PyObject *m = one ? PyNumber_Subtract(neg, one) : NULL;  /* -v - 1 */
        Py_DECREF(neg);
        Py_XDECREF(one);
        if (m == NULL)
            return ERR;
        unsigned long long u = PyLong_AsUnsignedLongLong(m);
        Py_DECREF(m);
        if (u == (unsigned long long)-1 && PyErr_Occurred()) {
            PyErr_Clear();
            return FALLBACK;
        }
        return head(b, 1, (uint64_t)u);
    }
    if (PyUnicode_CheckExact(o)) {
        Py_ssize_t n;
        const char *s = PyUnicode_AsUTF8AndSize(o, &n);
        if (s == NULL) {
            PyErr_Clear();
            return FALLBACK;
        }
        int rc = head(b, 3, (uint64_t)n);
        return rc != OK ? rc : put(b, s, n);
    }
    if (PyBytes_CheckExact(o)) {
        int rc = head(b, 2, (uint64_t)PyBytes_GET_SIZE(o));
        return rc != OK ? rc : put(b, PyBytes_AS_STRING(o), PyBytes_GET_SIZE(o));
    }
    if (PyFloat_CheckExact(o))
        return enc_float(b, PyFloat_AS_DOUBLE(o));
    if (PyDict_CheckExact(o))
        return enc_dict(b, o, depth);
    if (PyList_CheckExact(o) || PyTuple_CheckExact(o)) {
        PyObject *seq = o;
        Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
        PyObject **items = PySequence_Fast_ITEMS(seq);
        int rc = head(b, 4, (uint64_t)n);
        if (rc != OK)
            return rc;
        for (Py_ssize_t i = 0; i < n; i++) {
            /* a list may change under us only through __del__ tricks; re-check size */
            if (PyList_CheckExact(o) && i >= PyList_GET_SIZE(o))
                return FALLBACK;
            if ((rc = enc(b, items[i], depth + 1)) != OK)
                return rc;
        }
        return OK;
    }
    return FALLBACK;
}

/* --- decoding ------------------------------------------------------------------------ */

typedef struct {
    const unsigned char *p;
    Py_ssize_t pos;
    Py_ssize_t len;
} Rd;

static PyObject *fallback_obj;  /* the module's FALLBACK: "ask cbor2" */

/* read one head: FALLBACK for reserved/indefinite additional information or too few bytes */
static int
read_head(Rd *r, int *major, int *info, uint64_t *arg)
{
    if (r->pos >= r->len)
        return FALLBACK;
    unsigned char ib = r->p[r->pos++];
    *major = ib >> 5;
    *info = ib & 31;
    if (*info < 24) {
        *arg = (uint64_t)*info;
        return OK;
    }
    int n = *info == 24 ? 1 : *info == 25 ? 2 : *info == 26 ? 4 : *info == 27 ? 8 : 0;
    if (n == 0 || r->len - r->pos < n)
        return FALLBACK;
    uint64_t v = 0;
    for (int i = 0; i < n; i++)
        v = (v << 8) | r->p[r->pos + i];
    r->pos += n;
    *arg = v;
    return OK;
}

static double
half_to_double(uint16_t h)
{
    int e = (h >> 10) & 0x1f;
    int m = h & 0x3ff;
    double v;
    if (e == 0)
        v = ldexp((double)m, -24);
    else if (e != 31)
        v = ldexp((double)(m + 1024), e - 25);
    else
        v = m == 0 ? INFINITY : NAN;
    return (h & 0x8000) ? -v : v;
}

/* the next item as a new reference, or NULL with *rc = ERR (Python error set) or FALLBACK */
static PyObject *
dec(Rd *r, int depth, int *rc)
{
    int major, info;
    uint64_t arg;
    if (depth > MAX_DEPTH || (*rc = read_head(r, &major, &info, &arg)) != OK) {
        *rc = FALLBACK;
        return NULL;
    }
    Py_ssize_t left = r->len - r->pos;
    switch (major) {
    case 0:
        return PyLong_FromUnsignedLongLong(arg);
    case 1: {
        if (arg < ((uint64_t)1 << 63))
            return PyLong_FromLongLong(-1 - (long long)arg);
        PyObject *u = PyLong_FromUnsignedLongLong(arg);
        if (u == NULL) {
            *rc = ERR;
            return NULL;
        }
        PyObject *neg = PyNumber_Invert(u);  /* ~n == -1 - n */
        Py_DECREF(u);
        if (neg == NULL)
            *rc = ERR;
        return neg;
    }
    case 2: {
        if (arg > (uint64_t)left) {
            *rc = FALLBACK;
            return NULL;
        }
        PyObject *o = PyBytes_FromStringAndSize((const char *)r->p + r->pos, (Py_ssize_t)arg);
        r->pos += (Py_ssize_t)arg;
        if (o == NULL)
            *rc = ERR;
        return o;
    }
    case 3: {
        if (arg > (uint64_t)left) {
            *rc = FALLBACK;
            return NULL;
        }
        PyObject *o = PyUnicode_DecodeUTF8((const char *)r->p + r->pos, (Py_ssize_t)arg,
                                           "strict");
        r->pos += (Py_ssize_t)arg;
        if (o == NULL) {
            if (PyErr_ExceptionMatches(PyExc_UnicodeDecodeError)) {
                PyErr_Clear();
                *rc = FALLBACK;
            } else
                *rc = ERR;
        }
        return o;
    }
    case 4: {
        if (arg > (uint64_t)left) {  /* every item takes a byte at least */
            *rc = FALLBACK;
            return NULL;
        }
        PyObject *list = PyList_New((Py_ssize_t)arg);
        if (list == NULL) {
            *rc = ERR;
            return NULL;
        }
        for (Py_ssize_t i = 0; i < (Py_ssize_t)arg; i++) {
            PyObject *item = dec(r, depth + 1, rc);
            if (item == NULL) {
                Py_DECREF(list);
                return NULL;
            }
            PyList_SET_ITEM(list, i, item);
        }
        return list;
    }
    case 5: {
        if (arg > (uint64_t)left / 2) {  /* every pair takes two bytes at least */
            *rc = FALLBACK;
            return NULL;
        }
        PyObject *dict = PyDict_New();
        if (dict == NULL) {
            *rc = ERR;
            return NULL;
        }
        for (uint64_t i = 0; i < arg; i++) {
            PyObject *k = dec(r, depth + 1, rc);
            if (k == NULL) {
                Py_DECREF(dict);
                return NULL;
            }
            if (!PyUnicode_CheckExact(k) && !PyLong_CheckExact(k) && !PyBytes_CheckExact(k)) {
                Py_DECREF(k);  /* cbor2 makes tuples/frozendicts of container keys */
                Py_DECREF(dict);
                *rc = FALLBACK;
                return NULL;
            }
            PyObject *v = dec(r, depth + 1, rc);
            if (v == NULL) {
                Py_DECREF(k);
                Py_DECREF(dict);
                return NULL;
            }
            int bad = PyDict_SetItem(dict, k, v);
            Py_DECREF(k);
            Py_DECREF(v);
            if (bad < 0) {
                Py_DECREF(dict);
                *rc = ERR;
                return NULL;
            }
        }
        return dict;
    }
    case 7:
        switch (info) {
        case 20:
            Py_RETURN_FALSE;
        case 21:
            Py_RETURN_TRUE;
        case 22:
            Py_RETURN_NONE;
        case 25:
            return PyFloat_FromDouble(half_to_double((uint16_t)arg));
        case 26: {
            uint32_t bits = (uint32_t)arg;
            float f;
            memcpy(&f, &bits, 4);
            return PyFloat_FromDouble((double)f);
        }
        case 27: {
            double d;
            memcpy(&d, &arg, 8);
            return PyFloat_FromDouble(d);
        }
        default:
            break;
        }
        break;
    default:
        break;
    }
    *rc = FALLBACK;  /* tags, undefined, simple values */
    return NULL;
}

PyDoc_STRVAR(decode_doc,
"decode(data) -> object\n--\n\n"
"The first CBOR item of data, or FALLBACK if it is outside the decode subset.");

static PyObject *
decode(PyObject *mod, PyObject *obj)
{
    Py_buffer view;
    if (PyObject_GetBuffer(obj, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    Rd r = {(const unsigned char *)view.buf, 0, view.len};
    int rc = OK;
    PyObject *out = dec(&r, 0, &rc);
    PyBuffer_Release(&view);
    if (out == NULL && rc == FALLBACK) {
        Py_INCREF(fallback_obj);
        return fallback_obj;
    }
    return out;
}

PyDoc_STRVAR(encode_doc,
"encode(obj) -> bytes | None\n--\n\n"
"Deterministic CBOR of obj, or None if obj is outside the common subset.");

static PyObject *
encode(PyObject *mod, PyObject *obj)
{
    Buf b;
    b.cap = 256;
    b.len = 0;
    b.buf = PyMem_Malloc((size_t)b.cap);
    if (b.buf == NULL)
        return PyErr_NoMemory();
    int rc = enc(&b, obj, 0);
    PyObject *out = NULL;
    if (rc == OK)
        out = PyBytes_FromStringAndSize(b.buf, b.len);
    else if (rc == FALLBACK) {
        out = Py_None;
        Py_INCREF(out);
    }
    PyMem_Free(b.buf);
    return out;
}

static PyMethodDef methods[] = {
    {"encode", encode, METH_O, encode_doc},
    {"decode", decode, METH_O, decode_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_cborcore",
    "Deterministic CBOR encoding and decoding of the common subset, in C.", -1, methods,
};

PyMODINIT_FUNC
PyInit__cborcore(void)
{
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    fallback_obj = PyObject_CallNoArgs((PyObject *)&PyBaseObject_Type);
    if (fallback_obj == NULL || PyModule_AddObjectRef(m, "FALLBACK", fallback_obj) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
