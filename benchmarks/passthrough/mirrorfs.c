/*
 * mirrorfs: a measuring probe, not part of objfs. A minimal low-level libfuse (>= 3.17)
 * file system that mirrors a local directory, in one of four modes:
 *
 *   plain        every read and write is a request to this process
 *   writeback    as plain, with the kernel's writeback cache (what objfs asks for today)
 *   passthrough  files opened or created get a kernel backing file (FUSE_PASSTHROUGH,
 *                Linux >= 6.9): reads and writes never reach this process
 *   uring        as writeback, with requests and replies carried by io_uring instead of
 *                read(2)/write(2) on /dev/fuse (FUSE_OVER_IO_URING, Linux >= 6.14 with the
 *                fuse module's enable_uring set; libfuse >= 3.18 built with liburing)
 *
 * It answers only what Orthanc does to its StorageDirectory (lookup, getattr, mkdir, create,
 * open, read, write, fsync, flush, release, unlink, rmdir, statfs) and exists to measure
 * what kernel passthrough and FUSE over io_uring would bring objfs
 * (benchmarks/passthrough_probe.py).
 *
 *   mirrorfs SOURCE MOUNTPOINT MODE
 */
#define FUSE_USE_VERSION 317
#define _GNU_SOURCE

#include <errno.h>
#include <fcntl.h>
#include <fuse_lowlevel.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

enum mode { PLAIN, WRITEBACK, PASSTHROUGH, URING };

struct node {
	int fd;            /* O_PATH descriptor of the mirrored entry */
	uint64_t lookups;  /* kernel references, dropped by forget */
	int backing_id;    /* passthrough: one backing file per node while open */
	int opens;
};

static enum mode mode;
static struct node root_node;
static pthread_mutex_t nodes_lock = PTHREAD_MUTEX_INITIALIZER;
static const double TIMEOUT = 300.0; /* as objfs: names and attributes are stable */

static struct node *node_of(fuse_ino_t ino)
{
	return ino == FUSE_ROOT_ID ? &root_node : (struct node *)(uintptr_t)ino;
}

static void init(void *userdata, struct fuse_conn_info *conn)
{
	(void)userdata;
	if (mode == PASSTHROUGH) {
		if (!fuse_set_feature_flag(conn, FUSE_CAP_PASSTHROUGH)) {
			fprintf(stderr, "mirrorfs: the kernel does not offer passthrough\n");
			exit(2);
		}
	} else if (mode == WRITEBACK || mode == URING) {
		fuse_set_feature_flag(conn, FUSE_CAP_WRITEBACK_CACHE);
	}
	if (mode == URING) {
#ifdef FUSE_CAP_OVER_IO_URING
		if (!fuse_set_feature_flag(conn, FUSE_CAP_OVER_IO_URING)) {
			fprintf(stderr, "mirrorfs: the kernel does not offer FUSE over io_uring "
				"(is /sys/module/fuse/parameters/enable_uring Y?)\n");
			exit(2);
		}
#else
		fprintf(stderr, "mirrorfs: built against a libfuse without io_uring\n");
		exit(2);
#endif
	}
}

static int stat_node(struct node *n, struct stat *st)
{
	return fstatat(n->fd, "", st, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW);
}

/* Fill `e` for `name` under `parent`, taking one kernel reference. Returns an errno. */
static int make_entry(struct node *parent, const char *name, struct fuse_entry_param *e)
{
	memset(e, 0, sizeof(*e));
	int fd = openat(parent->fd, name, O_PATH | O_NOFOLLOW);
	if (fd < 0)
		return errno;
	if (fstatat(fd, "", &e->attr, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW) < 0) {
		int err = errno;
		close(fd);
		return err;
	}
	struct node *n = calloc(1, sizeof(*n));
	if (n == NULL) {
		close(fd);
		return ENOMEM;
	}
	n->fd = fd;
	n->lookups = 1;
	e->ino = (uintptr_t)n;
	e->attr_timeout = e->entry_timeout = TIMEOUT;
	return 0;
}

static void reply_entry_or_error(fuse_req_t req, struct node *parent, const char *name)
{
	struct fuse_entry_param e;
	int err = make_entry(parent, name, &e);
	if (err)
		fuse_reply_err(req, err);
	else
		fuse_reply_entry(req, &e);
}

static void lookup(fuse_req_t req, fuse_ino_t parent, const char *name)
{
	reply_entry_or_error(req, node_of(parent), name);
}

static void drop(fuse_ino_t ino, uint64_t count)
{
	if (ino == FUSE_ROOT_ID)
		return;
	struct node *n = node_of(ino);
	pthread_mutex_lock(&nodes_lock);
	n->lookups -= count;
	int gone = n->lookups == 0;
	pthread_mutex_unlock(&nodes_lock);
	if (gone) {
		close(n->fd);
		free(n);
	}
}

static void forget(fuse_req_t req, fuse_ino_t ino, uint64_t nlookup)
{
	drop(ino, nlookup);
	fuse_reply_none(req);
}

static void forget_multi(fuse_req_t req, size_t count, struct fuse_forget_data *forgets)
{
	for (size_t i = 0; i < count; i++)
		drop(forgets[i].ino, forgets[i].nlookup);
	fuse_reply_none(req);
}

static void getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	(void)fi;
	struct stat st;
	if (stat_node(node_of(ino), &st) < 0)
		fuse_reply_err(req, errno);
	else
		fuse_reply_attr(req, &st, TIMEOUT);
}

static void setattr(fuse_req_t req, fuse_ino_t ino, struct stat *attr, int to_set,
		    struct fuse_file_info *fi)
{
	struct node *n = node_of(ino);
	if (to_set & FUSE_SET_ATTR_SIZE) {
		char path[64];
		snprintf(path, sizeof(path), "/proc/self/fd/%d", n->fd);
		int rc = fi ? ftruncate((int)fi->fh, attr->st_size) : truncate(path, attr->st_size);
		if (rc < 0) {
			fuse_reply_err(req, errno);
			return;
		}
	}
	/* times and modes are accepted and ignored, as objfs does for attachments */
	getattr(req, ino, fi);
}

static void mkdir_(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t m)
{
	if (mkdirat(node_of(parent)->fd, name, m) < 0)
		fuse_reply_err(req, errno);
	else
		reply_entry_or_error(req, node_of(parent), name);
}

static void unlink_(fuse_req_t req, fuse_ino_t parent, const char *name)
{
	fuse_reply_err(req, unlinkat(node_of(parent)->fd, name, 0) < 0 ? errno : 0);
}

static void rmdir_(fuse_req_t req, fuse_ino_t parent, const char *name)
{
	fuse_reply_err(req, unlinkat(node_of(parent)->fd, name, AT_REMOVEDIR) < 0 ? errno : 0);
}

/* Set up the open reply for `fd` on node `n`: passthrough takes (or shares) a backing id. */
static int prepare_open(fuse_req_t req, struct node *n, int fd, struct fuse_file_info *fi)
{
	fi->fh = (uint64_t)fd;
	if (mode != PASSTHROUGH) {
		fi->keep_cache = 1;
		return 0;
	}
	pthread_mutex_lock(&nodes_lock);
	if (n->backing_id == 0)
		n->backing_id = fuse_passthrough_open(req, fd);
	int id = n->backing_id;
	if (id > 0)
		n->opens++;
	pthread_mutex_unlock(&nodes_lock);
	if (id <= 0)
		return EIO;
	fi->backing_id = id;
	return 0;
}

static int open_flags(int flags)
{
	flags &= ~O_NOFOLLOW;
	/* the writeback cache reads partial pages of files opened for writing */
	if ((mode == WRITEBACK || mode == URING) && (flags & O_ACCMODE) == O_WRONLY)
		flags = (flags & ~O_ACCMODE) | O_RDWR;
	return flags;
}

static void create(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t m,
		   struct fuse_file_info *fi)
{
	struct node *p = node_of(parent);
	int fd = openat(p->fd, name, open_flags(fi->flags) | O_CREAT, m);
	if (fd < 0) {
		fuse_reply_err(req, errno);
		return;
	}
	struct fuse_entry_param e;
	int err = make_entry(p, name, &e);
	if (!err)
		err = prepare_open(req, node_of(e.ino), fd, fi);
	if (err) {
		close(fd);
		fuse_reply_err(req, err);
		return;
	}
	fuse_reply_create(req, &e, fi);
}

static void open_(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	struct node *n = node_of(ino);
	char path[64];
	snprintf(path, sizeof(path), "/proc/self/fd/%d", n->fd);
	int fd = open(path, open_flags(fi->flags) & ~O_CREAT);
	if (fd < 0) {
		fuse_reply_err(req, errno);
		return;
	}
	int err = prepare_open(req, n, fd, fi);
	if (err) {
		close(fd);
		fuse_reply_err(req, err);
		return;
	}
	fuse_reply_open(req, fi);
}

static void read_(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
		  struct fuse_file_info *fi)
{
	(void)ino;
	struct fuse_bufvec buf = FUSE_BUFVEC_INIT(size);
	buf.buf[0].flags = FUSE_BUF_IS_FD | FUSE_BUF_FD_SEEK;
	buf.buf[0].fd = (int)fi->fh;
	buf.buf[0].pos = off;
	fuse_reply_data(req, &buf, FUSE_BUF_SPLICE_MOVE);
}

static void write_(fuse_req_t req, fuse_ino_t ino, const char *data, size_t size, off_t off,
		   struct fuse_file_info *fi)
{
	(void)ino;
	ssize_t done = pwrite((int)fi->fh, data, size, off);
	if (done < 0)
		fuse_reply_err(req, errno);
	else
		fuse_reply_write(req, (size_t)done);
}

static void flush(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	(void)ino;
	(void)fi;
	fuse_reply_err(req, 0);
}

static void fsync_(fuse_req_t req, fuse_ino_t ino, int datasync, struct fuse_file_info *fi)
{
	(void)ino;
	int rc = datasync ? fdatasync((int)fi->fh) : fsync((int)fi->fh);
	fuse_reply_err(req, rc < 0 ? errno : 0);
}

static void release(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	struct node *n = node_of(ino);
	close((int)fi->fh);
	if (mode == PASSTHROUGH) {
		pthread_mutex_lock(&nodes_lock);
		int id = 0;
		if (--n->opens == 0) {
			id = n->backing_id;
			n->backing_id = 0;
		}
		pthread_mutex_unlock(&nodes_lock);
		if (id > 0)
			fuse_passthrough_close(req, id);
	}
	fuse_reply_err(req, 0);
}

static void statfs_(fuse_req_t req, fuse_ino_t ino)
{
	(void)ino;
	struct statvfs sv;
	if (fstatvfs(root_node.fd, &sv) < 0)
		fuse_reply_err(req, errno);
	else
		fuse_reply_statfs(req, &sv);
}

static const struct fuse_lowlevel_ops ops = {
	.init = init,
	.lookup = lookup,
	.forget = forget,
	.forget_multi = forget_multi,
	.getattr = getattr,
	.setattr = setattr,
	.mkdir = mkdir_,
	.unlink = unlink_,
	.rmdir = rmdir_,
	.create = create,
	.open = open_,
	.read = read_,
	.write = write_,
	.flush = flush,
	.fsync = fsync_,
	.release = release,
	.statfs = statfs_,
};

int main(int argc, char *argv[])
{
	if (argc != 4) {
		fprintf(stderr, "usage: %s SOURCE MOUNTPOINT plain|writeback|passthrough|uring\n",
			argv[0]);
		return 2;
	}
	if (strcmp(argv[3], "plain") == 0)
		mode = PLAIN;
	else if (strcmp(argv[3], "writeback") == 0)
		mode = WRITEBACK;
	else if (strcmp(argv[3], "passthrough") == 0)
		mode = PASSTHROUGH;
	else if (strcmp(argv[3], "uring") == 0)
		mode = URING;
	else {
		fprintf(stderr, "mirrorfs: unknown mode %s\n", argv[3]);
		return 2;
	}
	root_node.fd = open(argv[1], O_PATH);
	if (root_node.fd < 0) {
		perror(argv[1]);
		return 1;
	}
	char *fake_argv[] = {argv[0], "-o",
			     mode == URING ? "default_permissions,fsname=mirrorfs,io_uring"
					   : "default_permissions,fsname=mirrorfs", NULL};
	struct fuse_args args = FUSE_ARGS_INIT(3, fake_argv);
	struct fuse_session *se = fuse_session_new(&args, &ops, sizeof(ops), NULL);
	if (se == NULL || fuse_set_signal_handlers(se) != 0)
		return 1;
	if (fuse_session_mount(se, argv[2]) != 0)
		return 1;
	struct fuse_loop_config *cfg = fuse_loop_cfg_create();
	fuse_loop_cfg_set_max_threads(cfg, 8);
	int rc = fuse_session_loop_mt(se, cfg);
	fuse_loop_cfg_destroy(cfg);
	fuse_session_unmount(se);
	fuse_remove_signal_handlers(se);
	fuse_session_destroy(se);
	return rc ? 1 : 0;
}
