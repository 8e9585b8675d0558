/* The fast queue backend's two per-packet system calls, in C (README: Queue backends).
 *
 * recv_packet(fd) reads one datagram from a queue's NETLINK_NETFILTER socket and, when it is the
 * usual one (a single packet message, its packet header first and its payload last, as the
 * kernel's nfqnl_build_packet_message makes it), returns (packet id, payload, real length,
 * NFQA_SKB_* flags, mark); any other datagram comes back as its bytes, for nfnetlink.parse; None
 * when the socket is empty. send_verdict(fd, queue, packet id, verdict, mark, payload) sends one
 * NFQNL_MSG_VERDICT, the new payload (if any) gathered from the caller's buffer, not copied.
 *
 * The same reading and the same message as shell/nfnetlink.py's single_packet and verdict, which
 * the pure build runs (tests/shell/test_fastio.py holds the two to the same answers). In Python
 * a packet's receive, parse and verdict took several times the CPU of NetfilterQueue's C, most of
 * it the interpreter's own code run cold after each wakeup (docs/benchmarks.md).
 *
 * Both calls keep the GIL: the socket is non-blocking, and the daemon's loop is one thread per
 * process, so the one receive buffer below is never shared.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <arpa/inet.h>
#include <sys/socket.h>
#include <sys/uio.h>

#define HEADER_LEN 20        /* nlmsghdr (16) + nfgenmsg (4) */
#define PACKET_TYPE 0x0300   /* NFNL_SUBSYS_QUEUE << 8 | NFQNL_MSG_PACKET */
#define VERDICT_TYPE 0x0301  /* NFNL_SUBSYS_QUEUE << 8 | NFQNL_MSG_VERDICT */
#define NLM_F_REQUEST 0x1
#define NLA_TYPE_MASK 0x3FFF
#define NFQA_PACKET_HDR 1
#define NFQA_VERDICT_HDR 2
#define NFQA_MARK 3
#define NFQA_PAYLOAD 10
#define NFQA_CAP_LEN 13
#define NFQA_SKB_INFO 14
#define PACKET_HDR_SIZE 7    /* be32 packet id, be16 hw_protocol, u8 hook */
#define MAX_PAYLOAD 0xFFFB   /* a netlink attribute's 16-bit length, less its header */

/* The largest datagram: a whole packet's copy plus the headers and attributes around it
 * (fastqueue.RECV_SIZE). */
static unsigned char buffer[0x10000 + 4096];

static uint16_t ne16(const unsigned char *p) { uint16_t v; memcpy(&v, p, 2); return v; }
static uint32_t ne32(const unsigned char *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static uint32_t be32(const unsigned char *p) { return ntohl(ne32(p)); }

/* The usual datagram's fields, or NULL with no error set when it is anything else. */
static PyObject *single_packet(Py_ssize_t size) {
    if (size < HEADER_LEN + 12)
        return NULL;
    uint32_t length = ne32(buffer);
    if (ne16(buffer + 4) != PACKET_TYPE || length > (uint32_t)size || length + 3 < (uint32_t)size)
        return NULL;
    uint32_t attr_len = ne16(buffer + HEADER_LEN);
    if ((ne16(buffer + HEADER_LEN + 2) & NLA_TYPE_MASK) != NFQA_PACKET_HDR || attr_len < 4 + PACKET_HDR_SIZE)
        return NULL;
    uint32_t packet_id = be32(buffer + HEADER_LEN + 4);
    uint32_t cap_len = 0, skb_info = 0, mark = 0;
    uint32_t offset = HEADER_LEN + ((attr_len + 3) & ~3u);
    while (offset + 4 <= length) {
        attr_len = ne16(buffer + offset);
        if (attr_len < 4 || offset + attr_len > length)
            return NULL;
        unsigned kind = ne16(buffer + offset + 2) & NLA_TYPE_MASK;
        if (kind == NFQA_PAYLOAD) {
            if (offset + attr_len + 3 < length)  /* not the last attribute: parse() decides */
                return NULL;
            uint32_t payload_len = attr_len - 4;
            return Py_BuildValue("(ky#kkk)", (unsigned long)packet_id, (const char *)buffer + offset + 4,
                                 (Py_ssize_t)payload_len, (unsigned long)(cap_len ? cap_len : payload_len),
                                 (unsigned long)skb_info, (unsigned long)mark);
        }
        if (kind == NFQA_PACKET_HDR)  /* a second header: parse() decides */
            return NULL;
        if (attr_len >= 8) {
            if (kind == NFQA_SKB_INFO)
                skb_info = be32(buffer + offset + 4);
            else if (kind == NFQA_MARK)
                mark = be32(buffer + offset + 4);
            else if (kind == NFQA_CAP_LEN)
                cap_len = be32(buffer + offset + 4);
        }
        offset += (attr_len + 3) & ~3u;
    }
    return NULL;
}

static int fd_of(PyObject *arg) {
    long fd = PyLong_AsLong(arg);
    if (fd == -1 && PyErr_Occurred())
        return -1;
    if (fd < 0 || fd > INT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "not a file descriptor");
        return -1;
    }
    return (int)fd;
}

static PyObject *recv_packet(PyObject *module, PyObject *arg) {
    int fd = fd_of(arg);
    if (fd < 0)
        return NULL;
    ssize_t size;
    do {
        size = recv(fd, buffer, sizeof buffer, MSG_DONTWAIT);
    } while (size < 0 && errno == EINTR);
    if (size < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK)
            Py_RETURN_NONE;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    PyObject *fields = single_packet(size);
    if (fields != NULL || PyErr_Occurred())
        return fields;
    return PyBytes_FromStringAndSize((const char *)buffer, size);
}

static PyObject *send_verdict(PyObject *module, PyObject *args) {
    int fd;
    unsigned int queue_num, packet_id, verdict;
    PyObject *mark, *payload;
    if (!PyArg_ParseTuple(args, "iIIIOO:send_verdict", &fd, &queue_num, &packet_id, &verdict, &mark, &payload))
        return NULL;
    if (queue_num > 0xFFFF) {
        PyErr_SetString(PyExc_ValueError, "queue number out of range");
        return NULL;
    }
    unsigned char head[HEADER_LEN + 12 + 8 + 4];
    size_t head_len = HEADER_LEN + 12;
    uint16_t u16;
    uint32_t u32;
    /* nfgenmsg: AF_UNSPEC, version 0, the queue number (big-endian) */
    head[16] = 0;
    head[17] = 0;
    u16 = htons((uint16_t)queue_num);
    memcpy(head + 18, &u16, 2);
    u16 = 12;
    memcpy(head + HEADER_LEN, &u16, 2);
    u16 = NFQA_VERDICT_HDR;
    memcpy(head + HEADER_LEN + 2, &u16, 2);
    u32 = htonl(verdict);
    memcpy(head + HEADER_LEN + 4, &u32, 4);
    u32 = htonl(packet_id);
    memcpy(head + HEADER_LEN + 8, &u32, 4);
    if (mark != Py_None) {
        unsigned long value = PyLong_AsUnsignedLong(mark);
        if (value == (unsigned long)-1 && PyErr_Occurred())
            return NULL;
        if (value > 0xFFFFFFFFul) {
            PyErr_SetString(PyExc_ValueError, "mark out of range");
            return NULL;
        }
        u16 = 8;
        memcpy(head + head_len, &u16, 2);
        u16 = NFQA_MARK;
        memcpy(head + head_len + 2, &u16, 2);
        u32 = htonl((uint32_t)value);
        memcpy(head + head_len + 4, &u32, 4);
        head_len += 8;
    }
    Py_buffer data = {0};
    int has_payload = payload != Py_None;
    if (has_payload) {
        if (PyObject_GetBuffer(payload, &data, PyBUF_SIMPLE) < 0)
            return NULL;
        if (data.len > MAX_PAYLOAD) {
            PyBuffer_Release(&data);
            PyErr_SetString(PyExc_ValueError, "a packet of that size does not fit a verdict");
            return NULL;
        }
        u16 = (uint16_t)(4 + data.len);
        memcpy(head + head_len, &u16, 2);
        u16 = NFQA_PAYLOAD;
        memcpy(head + head_len + 2, &u16, 2);
        head_len += 4;
    }
    static const unsigned char zeros[4] = {0};
    size_t pad = has_payload ? (size_t)((4 - (data.len & 3)) & 3) : 0;
    u32 = (uint32_t)(head_len + (has_payload ? (size_t)data.len + pad : 0));
    memcpy(head, &u32, 4);
    u16 = VERDICT_TYPE;
    memcpy(head + 4, &u16, 2);
    u16 = NLM_F_REQUEST;
    memcpy(head + 6, &u16, 2);
    memset(head + 8, 0, 8);  /* sequence number and port id: 0 */
    struct iovec parts[3] = {
        {head, head_len},
        {has_payload ? data.buf : NULL, has_payload ? (size_t)data.len : 0},
        {(void *)zeros, pad},
    };
    struct msghdr message = {0};
    message.msg_iov = parts;
    message.msg_iovlen = 3;
    ssize_t sent;
    do {
        sent = sendmsg(fd, &message, 0);
    } while (sent < 0 && errno == EINTR);
    if (has_payload)
        PyBuffer_Release(&data);
    if (sent < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"recv_packet", recv_packet, METH_O,
     "recv_packet(fd) -> (packet id, payload, real length, skb_info, mark) | bytes | None"},
    {"send_verdict", send_verdict, METH_VARARGS,
     "send_verdict(fd, queue_num, packet_id, verdict, mark | None, payload | None)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "nfq_tcpcrypt.shell._fastio",
    "The fast queue backend's receive and verdict in C (README: Queue backends).", -1, methods,
};

PyMODINIT_FUNC PyInit__fastio(void) { return PyModule_Create(&module); }
